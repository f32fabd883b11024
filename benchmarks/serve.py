"""Serving under load: our server (launch.serve) against `transformers serve --continuous-batching`.

  python benchmarks/serve.py [--hf_dir DIR] [--concurrency 1 4 16 64] [--max_tokens 64]
                             [--transformers_bin /path/to/venv/bin/transformers]

Both servers load the same tiny DeepSeek-V3 checkpoint (--hf_dir; default: a random one exported to a temp dir,
hidden 256, 4 layers, 16 experts, with the test fixture's tokenizer) and answer the same prompts through the
official `openai` client, streaming, at each concurrency. Each request's time to first token, its mean time per
output token after that, and the output tokens/s of the whole level are measured at the client. Both run on CPU
here with the machine's cores; transformers is timed only if --transformers_bin is given (it needs torch and
transformers >= 5, in a separate venv: `pip install torch==2.13.0 transformers accelerate`). Its continuous
batching (--transformers_cb) fails on MLA's unequal key and value widths, so it runs plain `transformers serve`,
and also its batched `generate` (benchmarks/hf_generate.py) at each concurrency as the batch size.

Prefix caching: the TTFT of a request whose 1k-token system prompt is cached, against the first such request.
The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import openai

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "hf", "tokenizer")
WORDS = ("the sky is blue because light scatters in the air and red light passes through while blue light is "
         "spread across the whole sky so we see it from every side").split()


def tiny_checkpoint(path: str) -> str:
    """A random DeepSeek-V3-shaped model small enough for CPU serving, with the fixture tokenizer."""
    import jax
    import jax.numpy as jnp

    import deepseek_jax as dsj
    from deepseek_jax.data import HFTokenizer

    cfg = dsj.ModelConfig(vocab_size=HFTokenizer.from_dir(TOKENIZER).vocab_size, hidden_size=256,
                          intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=8, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                          qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                          topk_group=2, first_k_dense_replace=1, max_position_embeddings=2048,
                          num_nextn_predict_layers=1, initializer_range=0.05)
    dsj.export_hf_checkpoint(cfg, dsj.init_params(cfg, jax.random.key(0)), path, dtype=jnp.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, name), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, timeout: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=5)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {proc.stderr.read()[-2000:]}")
        try:
            client.models.list()
            return proc
        except openai.APIConnectionError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not answer within {timeout}s")


def prompts(n: int, seed: int = 0, words: int = 24) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) for _ in range(n)]


async def one(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, system: str | None = None
              ) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    start, stamps = time.perf_counter(), []
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    ttft = (stamps[0] if stamps else end) - start
    return {"ttft": ttft, "tpot": (end - stamps[0]) / max(tokens - 1, 1) if stamps else float("nan"),
            "tokens": tokens}


async def level(url: str, model: str, concurrency: int, n: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)
    queue = list(prompts(n, seed=concurrency))
    results = []

    async def worker():
        while queue:
            results.append(await one(client, model, queue.pop(), max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = sorted(r["ttft"] for r in results)
    return {"concurrency": concurrency, "requests": n, "ttft_p50": statistics.median(ttft),
            "ttft_p99": float(np.percentile(ttft, 99)), "tpot_mean": statistics.mean(r["tpot"] for r in results),
            "output_tokens_per_s": sum(r["tokens"] for r in results) / wall}


def sweep(name: str, url: str, model: str, levels: list[int], max_tokens: int) -> list[dict]:
    asyncio.run(level(url, model, 1, 2, max_tokens))  # warm-up (compiles, caches)
    rows = []
    for c in levels:
        row = asyncio.run(level(url, model, c, max(2 * c, 8), max_tokens))
        rows.append(row)
        print(f"{name:13s} c={c:<3d} TTFT p50 {row['ttft_p50'] * 1e3:8.1f} ms  p99 {row['ttft_p99'] * 1e3:8.1f} ms  "
              f"TPOT {row['tpot_mean'] * 1e3:7.1f} ms  {row['output_tokens_per_s']:7.1f} tok/s", flush=True)
    return rows


def prefix_ttft(url: str, model: str) -> dict:
    system = " ".join(np.random.default_rng(7).choice(WORDS, 330))  # ~1,000 tokens of the fixture tokenizer

    async def run():
        client = openai.AsyncOpenAI(base_url=url, api_key="-", max_retries=0, timeout=3600)
        first = await one(client, model, "What colour is the sky?", 4, system)
        second = await one(client, model, "Why is it blue?", 4, system)
        cold = await one(client, model, "Why is it blue?", 4, system[::-1])  # same length, nothing cached
        await client.close()
        return first["ttft"], second["ttft"], cold["ttft"]

    first, second, cold = asyncio.run(run())
    print(f"prefix cache: 1k-token system prompt, TTFT first {first * 1e3:.0f} ms, second (cached) "
          f"{second * 1e3:.0f} ms ({first / second:.1f}x), uncached of the same length {cold * 1e3:.0f} ms")
    return {"first_ms": first * 1e3, "cached_ms": second * 1e3, "uncached_ms": cold * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--max_batch", type=int, default=64)
    ap.add_argument("--num_pages", type=int, default=512, help="64-token pages: 64 x (24 + 64) tokens, the 1k prefix")
    ap.add_argument("--transformers_bin", help="the `transformers` CLI of a venv with torch")
    ap.add_argument("--transformers_cb", action="store_true", help="try its --continuous-batching (fails on MLA)")
    ap.add_argument("--skip_ours", action="store_true")
    args = ap.parse_args()
    hf_dir = args.hf_dir or tiny_checkpoint(os.path.join(tempfile.mkdtemp(), "tiny-v3"))
    model = os.path.basename(os.path.normpath(hf_dir))
    out = {"hf_dir": hf_dir}
    if not args.skip_ours:
        port = free_port()
        proc = start([sys.executable, "-m", "launch.serve", "--hf_dir", hf_dir, "--port", str(port), "--max_batch",
                      str(args.max_batch), "--max_len", "2048", "--chunk", "256", "--num_pages",
                      str(args.num_pages)], port)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            out["ours"] = sweep("deepseek-jax", url, model, args.concurrency, args.max_tokens)
            out["prefix"] = prefix_ttft(url, model)
        finally:
            proc.terminate()
            proc.wait(60)
    if args.transformers_bin:
        # transformers 5.24's continuous batching cannot run DeepSeek-V3 (its paged cache copies K and V of one head
        # width, and MLA's keys are 192 wide against values of 128: index_copy_ fails); plain `serve` can
        port = free_port()
        cmd = [args.transformers_bin, "serve", "--port", str(port), hf_dir]
        proc = start(cmd + (["--continuous-batching"] if args.transformers_cb else []), port)
        try:
            out["transformers"] = sweep("transformers", f"http://127.0.0.1:{port}/v1", hf_dir, args.concurrency,
                                        args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(60)
        venv_python = os.path.join(os.path.dirname(args.transformers_bin), "python")
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(prompts(64, seed=0), f)
        done = subprocess.run([venv_python, os.path.join(HERE, "hf_generate.py"), "--hf_dir", hf_dir, "--prompts_json",
                               f.name, "--max_tokens", str(args.max_tokens), "--batch", *map(str, args.concurrency)],
                              capture_output=True, text=True, check=True)
        out["hf_generate"] = {int(k): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()}
        for c, rate in out["hf_generate"].items():
            print(f"transformers batched generate, batch {c:<3d} {rate:7.1f} tok/s", flush=True)
    if "ours" in out:
        ours = {r["concurrency"]: r["output_tokens_per_s"] for r in out["ours"]}
        if 1 in ours and 16 in ours:
            print(f"ours: 16 concurrent {ours[16] / ours[1]:.1f}x the tokens/s of one at a time")
        if "transformers" in out:
            theirs = {r["concurrency"]: r["output_tokens_per_s"] for r in out["transformers"]}
            for c in sorted(set(ours) & set(theirs)):
                print(f"c={c}: ours / transformers serve output tokens/s = {ours[c] / theirs[c]:.2f}; ours / its "
                      f"batched generate at batch {c} = {ours[c] / out['hf_generate'][c]:.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
