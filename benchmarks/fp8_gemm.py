"""Block-scaled FP8 GEMM (kernels_pallas.fp8_gemm) on DeepGEMM's published shapes, next to the XLA bf16 dot.

  python benchmarks/fp8_gemm.py [--m 64 128 4096] [--iters 20] [--grouped]

On a GPU: TFLOP/s (2 M N K / median time) of the Pallas kernel (E4M3 operands, 1x128 / 128x128 scales, FP32
promotion per 128 of K, bf16 out) and of jnp.dot in bf16 on the same shapes, their ratio, and the kernel's error
(FP32 out) against deepseek_jax.fp8.gemm_xla (the same sums as XLA dot_generals). --grouped adds the grouped kernel on
DeepSeek-V3 expert shapes (8 local experts, gate+up [7168 -> 4096] and down [2048 -> 7168]). Goal on an H200:
>= 1550 TFLOP/s (DeepGEMM's best on an H800) and >= 1.8x bf16.
On CPU it checks correctness only: the kernel in interpret mode against the XLA path, at the smallest M, with N
cut to 512 columns (the K loop, where the scales are applied, keeps its full length).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from deepseek_jax import fp8
from deepseek_jax.layers import gmm
from kernels_pallas.fp8_gemm import fp8_gemm, fp8_gemm_grouped

NK = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]  # DeepGEMM's table, from V3
EXPERT_NK = [(4096, 7168), (7168, 2048)]  # V3 routed experts: gate+up, down
GOAL_TFLOPS, GOAL_SPEEDUP = 1550.0, 1.8


def operands(m: int, n: int, k: int, groups: int | None = None, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    lead = () if groups is None else (groups,)
    codes = lambda key, shape: jnp.clip(jax.random.normal(key, shape) * 100, -448, 448).astype(jnp.float8_e4m3fn)
    a_q = codes(keys[0], (m, k))
    a_s = jax.random.uniform(keys[1], (m, -(-k // 128)), minval=0.5, maxval=1.0)
    b_q = codes(keys[2], (*lead, k, n))
    b_s = jax.random.uniform(keys[3], (*lead, -(-k // 128), -(-n // 128)), minval=0.5, maxval=1.0) / 1e4
    return a_q, a_s, b_q, b_s


def seconds(f, *args, iters: int) -> float:
    return median_seconds(f, *args, reps=iters, warmup=1)


def rel_err(got: jax.Array, want: jax.Array) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def dense_case(m: int, n: int, k: int, on_gpu: bool, iters: int) -> dict:
    args = operands(m, n, k)
    kernel = jax.jit(lambda *a: fp8_gemm(*a, out_dtype=jnp.bfloat16))
    f32 = jax.jit(lambda *a: fp8_gemm(*a, out_dtype=jnp.float32))
    row = {"kind": "dense", "m": m, "n": n, "k": k,
           "max_rel_err_vs_xla": rel_err(f32(*args), jax.jit(fp8.gemm_xla)(*args))}
    if on_gpu:
        flops = 2.0 * m * n * k
        t8 = seconds(kernel, *args, iters=iters)
        a, b = (jax.random.normal(jax.random.key(1), s, jnp.bfloat16) for s in ((m, k), (k, n)))
        t16 = seconds(jax.jit(jnp.dot), a, b, iters=iters)
        row |= {"fp8_tflops": flops / t8 / 1e12, "bf16_tflops": flops / t16 / 1e12, "speedup": t16 / t8}
    return row


def grouped_case(m: int, n: int, k: int, groups: int, on_gpu: bool, iters: int) -> dict:
    args = operands(m, n, k, groups)
    sizes = jnp.full((groups,), m // groups, jnp.int32)
    kernel = jax.jit(lambda *a: fp8_gemm_grouped(*a, out_dtype=jnp.bfloat16))
    f32 = jax.jit(lambda *a: fp8_gemm_grouped(*a, out_dtype=jnp.float32))
    xla = jax.jit(lambda *a: gmm.fp8_grouped_gemm(*a, impl="ragged" if on_gpu else "tiled"))
    row = {"kind": f"grouped x{groups}", "m": m, "n": n, "k": k,
           "max_rel_err_vs_xla": rel_err(f32(*args, sizes), xla(*args, sizes))}
    if on_gpu:
        flops = 2.0 * m * n * k
        t8 = seconds(kernel, *args, sizes, iters=iters)
        a, b = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16), jax.random.normal(
            jax.random.key(2), (groups, k, n), jnp.bfloat16)
        t16 = seconds(jax.jit(jax.lax.ragged_dot), a, b, sizes, iters=iters)
        row |= {"fp8_tflops": flops / t8 / 1e12, "bf16_tflops": flops / t16 / 1e12, "speedup": t16 / t8}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[64, 128, 4096])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--grouped", action="store_true", help="also the grouped kernel on V3 expert shapes")
    args = ap.parse_args()
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    ms = args.m if on_gpu else [min(args.m)]  # interpret mode on CPU: correctness at the smallest M only
    cols = (lambda n: n) if on_gpu else (lambda n: min(n, 512))
    rows = [dense_case(m, cols(n), k, on_gpu, args.iters) for m in ms for n, k in NK]
    if args.grouped:
        rows += [grouped_case(8192 if on_gpu else 256, cols(n), k, 8, on_gpu, args.iters) for n, k in EXPERT_NK]
    print(f"{device.device_kind}: FP8 block-scaled GEMM ({'timed' if on_gpu else 'interpret mode, correctness only'})")
    for r in rows:
        line = f"{r['kind']:>12} M={r['m']:>5} N={r['n']:>5} K={r['k']:>5}  err vs XLA {r['max_rel_err_vs_xla']:.1e}"
        if on_gpu:
            line += f"  fp8 {r['fp8_tflops']:7.1f} TFLOP/s  bf16 {r['bf16_tflops']:7.1f}  x{r['speedup']:.2f}"
        print(line)
    result = {"device": device.device_kind, "timed": on_gpu, "rows": rows}
    if on_gpu:
        best = max(r["fp8_tflops"] for r in rows)
        big = [r["speedup"] for r in rows if r["kind"] == "dense" and r["m"] >= 4096]
        result |= {"best_fp8_tflops": best, "min_speedup_m4096": min(big) if big else None,
                   "goal_tflops": GOAL_TFLOPS, "goal_speedup": GOAL_SPEEDUP}
        print(f"best {best:.0f} TFLOP/s (goal {GOAL_TFLOPS:.0f}); speedup over bf16 at M=4096: "
              f"min x{min(big):.2f} (goal x{GOAL_SPEEDUP})" if big else f"best {best:.0f} TFLOP/s")
    ok = all(r["max_rel_err_vs_xla"] < 1e-5 for r in rows)  # FP32 outputs: only the order of the FP32 sums differs
    result["correct"] = ok
    print("CORRECT" if ok else "MISMATCH")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
