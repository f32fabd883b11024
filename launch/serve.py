"""An OpenAI-compatible server for a training run or a HuggingFace checkpoint.

  python -m launch.serve --hf_dir=DIR [--host 127.0.0.1] [--port 8000] [--served_model_name NAME]
                         [--max_batch 8] [--max_len 2048] [--num_pages N] [--chunk 128] [--speculative]
  python -m launch.serve --workdir=RUN ...

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")`. Endpoints: /v1/models,
/v1/completions, /v1/chat/completions (the checkpoint's chat template, as launch.generate --chat), /health,
/metrics. SIGTERM (or Ctrl-C) stops taking connections, lets the running requests finish (up to
--shutdown_timeout seconds), then exits.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from deepseek_jax.checkpoint import CheckpointError
from deepseek_jax.data import DataError
from deepseek_jax.hf import CheckpointError as HFCheckpointError
from deepseek_jax.serve import Engine
from deepseek_jax.serve.api import create_app
from launch.generate import load


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a launch.train run directory (its latest checkpoint)")
    src.add_argument("--hf_dir", help="a HuggingFace checkpoint directory with tokenizer.json")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served_model_name", help="the model id clients send (default: the directory's name)")
    ap.add_argument("--max_batch", type=int, default=8, help="decode slots: requests running at once")
    ap.add_argument("--max_len", type=int, default=None, help="context per request (default: the model's, <= 4096)")
    ap.add_argument("--num_pages", type=int, default=None, help="cache pages (default: max_batch full contexts)")
    ap.add_argument("--page_size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=128, help="prefill tokens per engine step")
    ap.add_argument("--no_prefix_caching", action="store_true")
    ap.add_argument("--speculative", action="store_true", help="verify the MTP modules' drafts in every step")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    ap.add_argument("--shutdown_timeout", type=float, default=30.0)
    return ap.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[Engine, object, str]:
    cfg, params, tokenizer = load(args)
    max_len = args.max_len or min(cfg.max_position_embeddings, 4096)
    engine = Engine(cfg, params, max_batch=args.max_batch, max_len=max_len, page_size=args.page_size,
                    num_pages=args.num_pages, chunk=args.chunk, prefix_caching=not args.no_prefix_caching,
                    eos_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None, speculative=args.speculative)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.workdir or args.hf_dir))
    return engine, tokenizer, name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        engine, tokenizer, name = build(args)
    except (ValueError, DataError, CheckpointError, HFCheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    programs = engine.warmup()
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({engine.max_batch} slots, "
          f"{engine.pages.num_pages} pages of {engine.page_size} tokens, context {engine.max_len}, "
          f"{programs} programs compiled)", file=sys.stderr)
    uvicorn.run(create_app(engine, tokenizer, name), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.shutdown_timeout)


if __name__ == "__main__":
    main()
