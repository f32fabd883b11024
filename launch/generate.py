"""Generate text from a training run or a HuggingFace checkpoint.

  python -m launch.generate --workdir=RUN --prompt "def main(" [--prompt ...]
  python -m launch.generate --hf_dir=DIR --chat --prompt "Why is the sky blue?" --temperature=0.6 --top_p=0.95
  python -m launch.generate --workdir=RUN --prompts_file=prompts.txt --format=jsonl --speculative

A run loads its latest checkpoint and the sentencepiece model it saved; a HF directory its config.json,
safetensors, tokenizer.json and tokenizer_config.json (--chat renders the chat_template as transformers'
apply_chat_template(..., add_generation_prompt=True) does). All prompts go in one batch. Text streams to
stdout prompt by prompt; --format=jsonl prints one JSON object per prompt at the end instead. Speed (and,
with --speculative, the MTP acceptance rate) goes to stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax as dsj
from deepseek_jax.checkpoint import CheckpointError, load_run
from deepseek_jax.data import DataError, HFTokenizer, StreamDecoder, encode_prompt, run_tokenizer
from deepseek_jax.hf import CheckpointError as HFCheckpointError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a launch.train run directory (its latest checkpoint)")
    src.add_argument("--hf_dir", help="a HuggingFace checkpoint directory with tokenizer.json")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts_file", help="a text file with one prompt per line")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--top_k", type=int, default=0, help="0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speculative", action="store_true", help="draft with the MTP modules, verify in one pass")
    ap.add_argument("--format", choices=("text", "jsonl"), default="text")
    ap.add_argument("--max_len", type=int, default=None, help="cache slots per row (default: just enough)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="params and compute dtype (auto: float32 on CPU, else bfloat16)")
    ap.add_argument("--chunk", type=int, default=8, help="decode steps between text updates")
    return ap.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt (repeatable) or --prompts_file with one prompt per line")
    return prompts


def load(args: argparse.Namespace) -> tuple[dsj.ModelConfig, Any, Any]:
    """(config, params, tokenizer) from --workdir or --hf_dir, in the requested dtype."""
    dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if args.workdir:
        cfg, params, step = load_run(args.workdir)
        tokenizer = run_tokenizer(args.workdir)
        print(f"loaded {args.workdir} at step {step}", file=sys.stderr)
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    else:
        cfg, params = dsj.load_hf_checkpoint(args.hf_dir, dtype=jnp.dtype(dtype))
        tokenizer = HFTokenizer.from_dir(args.hf_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{cfg.vocab_size}: they do not belong together")
    return cfg.replace(dtype=dtype), params, tokenizer


def encode(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    """--chat wraps the prompt as one user turn of the chat template (data.encode_prompt)."""
    return encode_prompt(tokenizer, [{"role": "user", "content": prompt}] if chat else prompt)


def generated_ids(completion: dsj.infer.Completion, row: int) -> list[int]:
    return completion.completions[row, :completion.num_generated[row]].tolist()


def text_ids(ids: list[int], eos_id: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos_id else ids


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        prompts = read_prompts(args)
        cfg, params, tokenizer = load(args)
        ids = [encode(tokenizer, p, args.chat) for p in prompts]
        if min(map(len, ids)) == 0:
            raise ValueError(f"prompt {[len(x) for x in ids].index(0)} encodes to no tokens")
        lengths = np.array([len(x) for x in ids], np.int32)
        batch = np.full((len(ids), lengths.max()), max(tokenizer.pad_id, 0), np.int32)
        for row, x in enumerate(ids):
            batch[row, :len(x)] = x
        eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
        chunks = dsj.infer.stream(cfg, params, batch, args.max_new_tokens, args.temperature, args.top_p,
                                  jax.random.key(args.seed), args.speculative, top_k=args.top_k, eos_id=eos,
                                  lengths=lengths, max_len=args.max_len, chunk=args.chunk)
        start = time.time()
        first = next(chunks)  # the prefill (and its compile) is done
        decode_start = time.time()
        printer = TextPrinter(prompts, tokenizer, eos) if args.format == "text" else None
        marks = []  # (time, tokens) after each chunk; the first decode chunk also compiles the loop
        for result in itertools.chain([first], chunks):
            marks.append((time.time(), int(result.num_generated.sum())))
            if printer:
                printer.update(result)
        if printer:
            printer.finish()
    except (ValueError, DataError, CheckpointError, HFCheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    if args.format == "jsonl":
        for row, prompt in enumerate(prompts):
            new = generated_ids(result, row)
            print(json.dumps({"prompt": prompt, "prompt_token_ids": ids[row], "completion":
                              tokenizer.decode(text_ids(new, eos)), "completion_token_ids": new}, ensure_ascii=False))
    (t0, n0), (t1, n1) = marks[min(1, len(marks) - 1)], marks[-1]
    rate = f"{(n1 - n0) / (t1 - t0):,.1f} tokens/s after compiling" if n1 > n0 else "too short to time"
    print(f"{n1} tokens in {t1 - start:.2f}s (prefill and compile {decode_start - start:.2f}s); decode {rate}, "
          f"{result.steps} steps", file=sys.stderr)
    if args.speculative:
        per_step = (n1 - len(prompts)) / max(result.steps * len(prompts), 1)
        print(f"speculative: {result.accepted}/{result.drafted} MTP drafts accepted "
              f"({100 * result.acceptance_rate:.1f}%), {per_step:.2f} tokens per step per prompt", file=sys.stderr)


class TextPrinter:
    """Streams the completions to stdout in prompt order: the current prompt's text as it arrives; a later
    prompt, generated in the same batch, catches up when its turn comes."""

    def __init__(self, prompts: list[str], tokenizer: Any, eos: int | None):
        self.prompts, self.eos, self.row = prompts, eos, 0
        self.decoders = [StreamDecoder(tokenizer) for _ in prompts]
        self.pending = [""] * len(prompts)
        self.fed = [0] * len(prompts)
        self._header()

    def _header(self) -> None:
        if len(self.prompts) > 1:
            print(f"{'' if self.row == 0 else chr(10)}=== [{self.row}] {self.prompts[self.row]}", flush=True)
        print(self.prompts[self.row], end="", flush=True)

    def update(self, result: dsj.infer.Completion) -> None:
        for row in range(len(self.prompts)):
            ids = text_ids(generated_ids(result, row), self.eos) if result.done[row] else generated_ids(result, row)
            self.pending[row] += self.decoders[row].push(ids[self.fed[row]:])
            self.fed[row] = len(ids)
        while True:
            print(self.pending[self.row], end="", flush=True)
            self.pending[self.row] = ""
            if not result.done[self.row] or self.row == len(self.prompts) - 1:
                return
            print(self.decoders[self.row].flush(), flush=True)
            self.row += 1
            self._header()

    def finish(self) -> None:
        print(self.pending[self.row] + self.decoders[self.row].flush(), flush=True)


if __name__ == "__main__":
    main()
