"""HBM bandwidth of the MLA decode kernel (kernels_pallas.mla_decode) next to plain XLA, DeepSeek-V3 shapes.

  python benchmarks/mla_decode.py [--batch 64 128] [--context 1024 4096 16384] [--block_kv N] [--num_splits N]

On an accelerator: 128 heads, kv_lora_rank 512, rope 64, bf16 cache, each row's length drawn in [L/2, L].
GB/s = (bytes of kv_latent + k_rope for the valid lengths + q + out) / median time of --reps runs after
warmup, for the kernel and for the jnp reference (einsum + masked softmax, which reads the whole cache)
on the same useful bytes. On CPU it only checks the kernel (interpret mode) against the jnp path on small
shapes. Prints a table and, as its last line, a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from deepseek_jax.layers.mla import attend
from deepseek_jax.model import cache_mask
from kernels_pallas.mla_decode import mla_decode

HEADS, LATENT, ROPE = 128, 512, 64
PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "B200": 8000.0}  # HBM, by device_kind substring


def reference(q, qr, kv, kr, lengths, scale):
    """Plain XLA: the jnp absorbed attention the decode path runs without the kernel (layers.mla.attend), over the
    whole cache with the causal cache mask; q [B, H, C] or [B, T, H, C] (the T queries end each row)."""
    four = q.ndim == 4
    q, qr = (q, qr) if four else (q[:, None], qr[:, None])
    positions = lengths[:, None] - q.shape[1] + jnp.arange(q.shape[1])
    out = attend(jnp.concatenate([q, qr], -1), jnp.concatenate([kv, kr], -1), kv, cache_mask(positions, kv.shape[1]),
                 scale)
    return out if four else out[:, 0]


def inputs(batch: int, context: int, queries: int = 1, heads: int = HEADS, latent: int = LATENT, rope: int = ROPE,
           dtype=jnp.bfloat16, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 4)
    q_shape = (batch, heads) if queries == 1 else (batch, queries, heads)
    q = jax.random.normal(k[0], (*q_shape, latent), dtype)
    qr = jax.random.normal(k[1], (*q_shape, rope), dtype)
    kv = jax.random.normal(k[2], (batch, context, latent), dtype)
    kr = jax.random.normal(k[3], (batch, context, rope), dtype)
    lengths = jnp.asarray(np.random.default_rng(seed).integers(context // 2, context + 1, batch), jnp.int32)
    return q, qr, kv, kr, lengths


def bench(fn, *args, reps: int = 5) -> float:
    return median_seconds(fn, *args, reps=reps, warmup=3)


def cpu_check() -> dict:
    """Interpret-mode kernel against the jnp path, f32 and bf16, 3-D and 4-D queries, ragged lengths."""
    errs = {}
    for dtype, queries in ((jnp.float32, 1), (jnp.float32, 2), (jnp.bfloat16, 1)):
        args = inputs(3, 200, queries, heads=8, latent=64, rope=16, dtype=dtype)
        args = (*args[:4], jnp.array([2, 77, 200], jnp.int32))  # every query sees a key
        got = mla_decode(*args, 0.125, block_kv=32, num_splits=3).astype(jnp.float32)
        want = reference(*args, 0.125).astype(jnp.float32)
        errs[f"{jnp.dtype(dtype).name} T={queries}"] = float(jnp.max(jnp.abs(got - want)))
    ok = all(e < (2e-2 if "bfloat16" in k else 1e-4) for k, e in errs.items())
    for k, e in errs.items():
        print(f"cpu check {k:>14}: max |kernel - jnp| = {e:.2e}")
    print(f"CORRECTNESS {'OK' if ok else 'FAILED'}; GPU figures pending (no accelerator here)")
    return {"backend": "cpu", "max_abs_err": errs, "ok": ok, "gpu": "pending"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--block_kv", type=int, default=None)
    ap.add_argument("--num_splits", type=int, default=None)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if jax.default_backend() == "cpu":
        print(json.dumps(cpu_check()))
        return
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_GBS.items() if k in kind), None)
    scale = (LATENT // 4 + ROPE) ** -0.5  # (qk_nope + qk_rope)^-1/2 for V3's 128 + 64
    kernel = jax.jit(functools.partial(mla_decode, softmax_scale=scale, block_kv=args.block_kv,
                                       num_splits=args.num_splits))
    xla = jax.jit(functools.partial(reference, scale=scale))
    rows = []
    print(f"{kind}: H={HEADS} C={LATENT} R={ROPE} bf16, lengths in [L/2, L]"
          + (f", HBM peak {peak:.0f} GB/s" if peak else ""))
    print(f"{'batch':>5} {'L':>6} {'kernel ms':>9} {'GB/s':>7} {'xla ms':>8} {'GB/s':>7} {'speedup':>7} {'max err':>8}")
    for batch in args.batch:
        for context in args.context:
            q, qr, kv, kr, lengths = inputs(batch, context)
            useful = int(jnp.sum(lengths)) * (LATENT + ROPE) * 2 + 2 * q.nbytes + qr.nbytes
            row = {"batch": batch, "context": context, "useful_bytes": useful}
            t_xla = bench(xla, q, qr, kv, kr, lengths, reps=args.reps)
            row |= {"xla_s": t_xla, "xla_gbs": useful / t_xla / 1e9}
            try:
                t = bench(kernel, q, qr, kv, kr, lengths, reps=args.reps)
                err = jnp.max(jnp.abs(kernel(q, qr, kv, kr, lengths).astype(jnp.float32)
                                      - xla(q, qr, kv, kr, lengths).astype(jnp.float32)))
                row |= {"kernel_s": t, "kernel_gbs": useful / t / 1e9, "max_abs_err": float(err)}
                print(f"{batch:>5} {context:>6} {1e3 * t:>9.3f} {row['kernel_gbs']:>7.0f} {1e3 * t_xla:>8.3f} "
                      f"{row['xla_gbs']:>7.0f} {t_xla / t:>7.2f} {float(err):>8.1e}")
            except Exception as e:  # keep the XLA figures when the kernel fails to compile or run
                row["kernel_error"] = f"{type(e).__name__}: {str(e)[:500]}"
                print(f"{batch:>5} {context:>6} {'FAILED':>9} {'':>7} {1e3 * t_xla:>8.3f} {row['xla_gbs']:>7.0f}  "
                      f"{row['kernel_error'][:120]}")
            rows.append(row)
            del q, qr, kv, kr
    print(json.dumps({"backend": jax.default_backend(), "device_kind": kind, "peak_gbs": peak, "rows": rows}))


if __name__ == "__main__":
    main()
