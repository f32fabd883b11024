"""Decoding: what the latent cache saves, and what MTP speculative decoding buys.

  python benchmarks/decode.py [--workdir RUN] [--context 4096] [--batch 1 8] [--new 128]

1. Cache bytes per token, MLA (c_KV + k_R per layer) against MHA with the same heads (per-head K and V), bf16,
   for the tiny, v2_lite and v3_671b configs.
2. Decode tokens/s at a long context on this machine: the absorbed latent cache against MHA's per-head K/V
   cache (layout="heads"), same model and engine, a V2-Lite attention block (16 heads, kv_lora 512, rope 64,
   nope 128, v 128) in a 2-layer model. Only the decode loop is timed (after compiling, prefill excluded).
3. Speculative (MTP) against plain greedy decoding on a trained tiny model (the run at --workdir, or a fresh
   `launch.train` default run, ~3 minutes): the acceptance rate, the tokens are equal, and the speed-up.
Ratios come from one run each (this machine is shared and noisy). The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax as dsj
import deepseek_jax.infer.decode as engine
from configs import model_config, small_moe, tiny, v2_lite, v3_671b
from deepseek_jax.checkpoint import load_run
from deepseek_jax.data import default_documents, run_tokenizer
from deepseek_jax.infer import cache_bytes_per_token, mha_cache_bytes_per_token


def cache_table() -> dict:
    rows = {}
    for name, module in (("tiny", tiny), ("small_moe", small_moe), ("v2_lite", v2_lite), ("v3_671b", v3_671b)):
        cfg = model_config(module.get_config())
        mla, mha = cache_bytes_per_token(cfg, jnp.bfloat16, mtp=False), mha_cache_bytes_per_token(cfg, jnp.bfloat16)
        rows[name] = {"mla_bytes": mla, "mha_bytes": mha, "saved": 1 - mla / mha}
        print(f"{name:10s} MLA {mla:>9,} B/token   MHA {mha:>11,} B/token   {100 * (1 - mla / mha):5.1f}% smaller "
              f"({mha / mla:.1f}x)")
    return rows


def time_decode(cfg, params, prompts, new: int, layout: str, speculative: bool = False,
                reps: int = 3) -> tuple[float, object]:
    """Median seconds of the compiled decode loop alone (prefill outside the timing), after a compile run."""
    s, _, tokens, lengths = engine._prepare(cfg, prompts, new, 0.0, 1.0, None, speculative, cache_layout=layout)
    key, times = jax.random.key(0), []
    for _ in range(reps + 1):  # the first run compiles
        state = jax.block_until_ready(engine._prefill(params, tokens, lengths, key, s))
        start = time.perf_counter()
        state = jax.block_until_ready(engine._run(params, state, jnp.asarray(new, jnp.int32), s))
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:])), state


def long_context(context: int, batches: list[int], new: int) -> dict:
    cfg = dsj.ModelConfig(
        vocab_size=1024, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        num_nextn_predict_layers=0, rope_type="default", rope_factor=1.0, max_position_embeddings=context + new,
        initializer_range=0.02, attention_chunk=512)
    params = dsj.init_params(cfg, jax.random.key(0))
    out = {}
    for batch in batches:
        prompts = np.asarray(jax.random.randint(jax.random.key(1), (batch, context - new), 0, cfg.vocab_size))
        result = {}
        for layout in ("latent", "heads"):
            seconds, state = time_decode(cfg, params, prompts, new, layout)
            result[layout] = {"tokens_per_s": batch * (new - 1) / seconds,
                              "cache_mib": sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
                                  state.cache.layers)) / 2**20, "tokens": np.asarray(state.out)}
        same = bool((result["latent"].pop("tokens") == result["heads"].pop("tokens")).all())
        ratio = result["latent"]["tokens_per_s"] / result["heads"]["tokens_per_s"]
        print(f"context {context}, batch {batch}: latent {result['latent']['tokens_per_s']:.1f} tokens/s "
              f"({result['latent']['cache_mib']:.0f} MiB cache), per-head K/V {result['heads']['tokens_per_s']:.1f} "
              f"tokens/s ({result['heads']['cache_mib']:.0f} MiB): {ratio:.2f}x, same tokens: {same}")
        out[batch] = result | {"ratio": ratio, "same_tokens": same}
    return out


def trained_tiny(workdir: str | None) -> str:
    if workdir:
        return workdir
    from launch.train import train

    workdir = os.path.join("runs", "bench_decode_tiny")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        print(f"training the default tiny model in {workdir} (python -m launch.train)")
        train(tiny.get_config(), workdir)
    return workdir


def speculative(workdir: str, batches: list[int], new: int, prompt_tokens: int = 32) -> dict:
    cfg, params, step = load_run(workdir)
    tok = run_tokenizer(workdir)
    docs = [d for d in default_documents() if len(d) > 4 * prompt_tokens][::97]  # spread over the corpus
    out = {}
    for batch in batches:
        prompts = np.asarray([tok.encode(d)[:prompt_tokens] for d in docs[:batch]])
        t_plain, plain = time_decode(cfg, params, prompts, new, "latent", reps=9)
        t_spec, spec = time_decode(cfg, params, prompts, new, "latent", speculative=True, reps=9)
        same = bool((np.asarray(plain.out)[:, :new] == np.asarray(spec.out)[:, :new]).all())
        rate = int(spec.accepted) / max(int(spec.drafted), 1)
        ratio = t_plain / t_spec
        print(f"trained tiny (step {step}), batch {batch}, {new} tokens: plain {batch * (new - 1) / t_plain:.0f} "
              f"tokens/s, speculative {batch * (new - 1) / t_spec:.0f} tokens/s ({ratio:.2f}x), acceptance "
              f"{100 * rate:.1f}%, {int(plain.steps)} -> {int(spec.steps)} steps, same tokens: {same}")
        out[batch] = {"speedup": ratio, "acceptance": rate, "same_tokens": same, "steps_plain": int(plain.steps),
                      "steps_speculative": int(spec.steps)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="a trained launch.train run (default: train the tiny default once)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--long_new", type=int, default=32, help="tokens decoded at the long context")
    args = ap.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"== cache bytes per token (bf16), backend {jax.default_backend()}")
    result = {"cache": cache_table()}
    print(f"== decode at {args.context} tokens of context: latent cache vs per-head K/V")
    result["long_context"] = long_context(args.context, args.batch, args.long_new)
    print("== MTP speculative vs plain greedy")
    result["speculative"] = speculative(trained_tiny(args.workdir), args.batch, args.new)
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
