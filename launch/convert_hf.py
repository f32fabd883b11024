"""Convert between HuggingFace DeepSeek checkpoints and orbax param checkpoints.

  python -m launch.convert_hf --hf_dir=HF_DIR --out=DIR        # writes DIR/config.json + DIR/params (orbax)
  python -m launch.convert_hf --to_hf --params=DIR --out=HF_DIR [--fp8]      # DIR: an import, or a training run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import orbax.checkpoint as ocp

import deepseek_jax as dsj
from deepseek_jax.checkpoint import CheckpointError, is_run, load_run

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", help="HF checkpoint directory (config.json + *.safetensors) to import")
    ap.add_argument("--params", help="with --to_hf: a training workdir (its latest checkpoint), or a directory "
                                     "written by the import (config.json + params/)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--to_hf", action="store_true", help="export orbax params to HF safetensors")
    ap.add_argument("--fp8", action="store_true", help="with --to_hf: E4M3 weights + 128x128 weight_scale_inv")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    start = time.time()
    if args.to_hf:
        if not args.params:
            ap.error("--to_hf needs --params")
        src = os.path.abspath(args.params)
        if is_run(src):
            try:
                cfg, params, step = load_run(src)
            except CheckpointError as e:
                sys.exit(f"error: {e}")
            print(f"exporting step {step} of {src}")
        elif os.path.isdir(os.path.join(src, "params")):
            cfg = dsj.ModelConfig.from_hf(os.path.join(src, "config.json"))
            params = ocp.StandardCheckpointer().restore(os.path.join(src, "params"))
        else:
            sys.exit(f"error: --params={src} is neither a training workdir (config.json + checkpoints/) nor an "
                     "import (config.json + params/)")
        dsj.export_hf_checkpoint(cfg, params, out, dtype=DTYPES[args.dtype], fp8_weights=args.fp8)
    else:
        if not args.hf_dir:
            ap.error("give --hf_dir to import, or --to_hf with --params to export")
        cfg, params = dsj.load_hf_checkpoint(args.hf_dir, dtype=DTYPES[args.dtype])
        os.makedirs(out, exist_ok=True)
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(out, "params"), params)
        ckpt.wait_until_finished()
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg.to_hf(), f, indent=1)
    print(f"wrote {out} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
