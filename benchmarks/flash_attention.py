"""The flash-attention kernel (kernels_pallas.flash_attention) next to the plain XLA path, MLA training shapes.

  python benchmarks/flash_attention.py [--batch 1 2 4] [--seq 4096] [--heads 16] [--docs 1] [--reps 10]
  /opt/tpuvenv/bin/python benchmarks/flash_attention.py --tpu_aot [--topology v5p:2x2x1] [--heads 128]

On an accelerator: dqk = 192 (128 nope + 64 rope), dv = 128, bf16, t = s = --seq, causal within --docs equal
documents per row. ms: median of --reps runs after warmup, of the forward and of forward + backward (a vjp with a
fixed cotangent); TFLOP/s over the causal FLOPs, 2 (dqk + dv) per visible pair forward and 2.5x that backward
(FlashAttention-2's count; the kernel recomputes more); max |kernel - XLA| of o and of dq, dk, dv, next to the
XLA values' max. XLA: reference() of the kernel module (materialized mask, f32 softmax). On CPU only a tiny
interpret-mode correctness check. --tpu_aot: fwd and fwd + bwd compiled for one device of a described TPU slice
(libtpu, no TPU: see mla_decode_tpu_lowering.py), V3's 128 heads at batch 1, printing memory and FLOPs (XLA's
count, i.e. the kernels' cost estimates). Last line: a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from timing import median_seconds

from kernels_pallas.flash_attention import flash_attention, reference

DQK, DV = 192, 128  # V3: qk_nope_head_dim + qk_rope_head_dim, v_head_dim
SCALE = DQK**-0.5


def inputs(batch: int, seq: int, heads: int, docs: int = 1, dqk: int = DQK, dv: int = DV, dtype=jnp.bfloat16,
           seed: int = 0, sharding=None):
    """q, k, v, q_positions, q_segment_ids, kv_segment_ids for packed rows of `docs` equal documents; shapes
    only (ShapeDtypeStructs) when `sharding` is given."""
    shapes = [(batch, seq, heads, dqk), (batch, seq, heads, dqk), (batch, seq, heads, dv)]
    if sharding is not None:
        return ([jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
                + [jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding)] * 3)
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, s, dtype) for key, s in zip(keys, shapes, strict=True))
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    seg = 1 + pos * docs // seq
    return q, k, v, pos, seg, seg


def fwd_bwd(attn):
    """(o, (dq, dk, dv)) of attn for the cotangent do."""
    def f(q, k, v, pos, q_seg, kv_seg, do):
        o, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, pos, q_seg, kv_seg), q, k, v)
        return o, vjp(do)
    return f


def errors(got, want) -> dict:
    """max |got - want| of o, dq, dk, dv and the max |want| of each."""
    names, got, want = ("o", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)
    diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    return {n: {"max_abs_err": diff(a, b), "max_abs": float(jnp.max(jnp.abs(b.astype(jnp.float32))))}
            for n, a, b in zip(names, got, want, strict=True)}


def bench(fn, *args, reps: int = 5) -> float:
    return median_seconds(fn, *args, reps=reps, warmup=2)


def cpu_check() -> dict:
    """Interpret-mode kernel (forward and gradients) against the XLA path: f32 and bf16, 3 documents per row,
    t = 200 (not a multiple of the blocks)."""
    out = {}
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        args = inputs(2, 200, 2, docs=3, dqk=48, dv=32, dtype=dtype)
        do = jax.random.normal(jax.random.key(1), (2, 200, 2, 32), dtype)
        kernel = fwd_bwd(functools.partial(flash_attention, scale=SCALE, block_q=32, block_k=32))
        f32 = [x.astype(jnp.float32) if x.dtype == dtype else x for x in (*args, do)]
        err = errors(jax.jit(kernel)(*args, do), jax.jit(fwd_bwd(functools.partial(reference, scale=SCALE)))(*f32))
        rel = max(e["max_abs_err"] / e["max_abs"] for e in err.values())
        out[jnp.dtype(dtype).name] = {"errors": err, "max_rel_err": rel, "ok": rel < tol}
        print(f"cpu check {jnp.dtype(dtype).name:>8}: max |kernel - xla| / max |xla| over o, dq, dk, dv = {rel:.2e}")
    ok = all(v["ok"] for v in out.values())
    print(f"CORRECTNESS {'OK' if ok else 'FAILED'}; accelerator figures pending (no accelerator here)")
    return {"backend": "cpu", "checks": out, "ok": ok, "accelerator": "pending"}


def tpu_aot(topology: str, batch: int, seq: int, heads: int) -> dict:
    """Compile fwd and fwd + bwd for one device of a described TPU slice; memory and FLOPs per case."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: another compile may hold the lock
    from benchmarks.mla_decode_tpu_lowering import tpu_device

    device = tpu_device(topology)
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = inputs(batch, seq, heads, sharding=sharding)
    attn = functools.partial(flash_attention, scale=SCALE, interpret=False)
    cases = []
    for name, f, extra in (("fwd", attn, []), ("fwd+bwd", fwd_bwd(attn), [args[2]])):
        lowered = jax.jit(f, out_shardings=sharding).lower(*args, *extra)
        t = time.perf_counter()
        compiled = lowered.compile()
        mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        case = {"case": name, "kernels": lowered.as_text().count("tpu_custom_call"),
                "compile_s": time.perf_counter() - t, "argument_bytes": mem.argument_size_in_bytes,
                "output_bytes": mem.output_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
                "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}
        cases.append(case)
        print(f"{device.device_kind} {name} b={batch} t=s={seq} h={heads} dqk={DQK} dv={DV} bf16: "
              f"{case['kernels']} Mosaic kernels, compiled in {case['compile_s']:.1f} s; arguments "
              f"{case['argument_bytes'] / 2**20:.1f} MiB, output {case['output_bytes'] / 2**20:.1f} MiB, "
              f"temporaries {case['temp_bytes'] / 2**20:.1f} MiB, {case['flops']:.3e} FLOPs (XLA's count)")
    return {"device_kind": device.device_kind, "topology": topology, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=None, help="default 16 (timing), 128 (--tpu_aot: V3)")
    ap.add_argument("--docs", type=int, default=1, help="equal documents packed per row")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tpu_aot", action="store_true")
    ap.add_argument("--topology", default="v5p:2x2x1")
    args = ap.parse_args()
    if args.tpu_aot:
        print(json.dumps(tpu_aot(args.topology, args.batch[0], args.seq, args.heads or 128)))
        return
    if jax.default_backend() == "cpu":
        print(json.dumps(cpu_check()))
        return
    heads, kind = args.heads or 16, jax.devices()[0].device_kind
    kernel = functools.partial(flash_attention, scale=SCALE)
    xla = functools.partial(reference, scale=SCALE)
    rows = []
    print(f"{kind}: t=s={args.seq}, h={heads}, dqk={DQK}, dv={DV}, bf16, {args.docs} document(s) per row")
    print(f"{'batch':>5} {'fwd ms':>8} {'xla':>8} {'fwd+bwd ms':>10} {'xla':>8} {'TFLOP/s':>7} {'speedup':>7} "
          f"{'max err o / dq / dk / dv (xla max)':>36}")
    for batch in args.batch:
        q, k, v, pos, q_seg, kv_seg = inputs(batch, args.seq, heads, args.docs)
        do = jax.random.normal(jax.random.key(1), v.shape, v.dtype)
        flops = 2 * batch * heads * args.seq * (args.seq + 1) / 2 * (DQK + DV)
        row = {"batch": batch}
        for name, attn in (("xla", xla), ("kernel", kernel)):
            try:
                f, g = jax.jit(attn), jax.jit(fwd_bwd(attn))
                row[f"{name}_fwd_s"] = bench(f, q, k, v, pos, q_seg, kv_seg, reps=args.reps)
                row[f"{name}_fwd_bwd_s"] = bench(g, q, k, v, pos, q_seg, kv_seg, do, reps=args.reps)
                row[f"{name}_tflops"] = 3.5 * flops / row[f"{name}_fwd_bwd_s"] / 1e12
                row[f"{name}_out"] = g(q, k, v, pos, q_seg, kv_seg, do)
            except Exception as e:  # keep the other path's figures when one fails to compile or run
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        if "kernel_out" in row and "xla_out" in row:
            row["errors"] = errors(row.pop("kernel_out"), row.pop("xla_out"))
            e = row["errors"]
            print(f"{batch:>5} {1e3 * row['kernel_fwd_s']:>8.3f} {1e3 * row['xla_fwd_s']:>8.3f} "
                  f"{1e3 * row['kernel_fwd_bwd_s']:>10.3f} {1e3 * row['xla_fwd_bwd_s']:>8.3f} "
                  f"{row['kernel_tflops']:>7.1f} {row['xla_fwd_bwd_s'] / row['kernel_fwd_bwd_s']:>7.2f} "
                  + " / ".join(f"{e[n]['max_abs_err']:.1e} ({e[n]['max_abs']:.1e})" for n in e))
        else:
            row.pop("kernel_out", None), row.pop("xla_out", None)
            print(f"{batch:>5} FAILED: {row.get('kernel_error') or row.get('xla_error')}"[:200])
        rows.append(row)
        del q, k, v, do
    print(json.dumps({"backend": jax.default_backend(), "device_kind": kind, "seq": args.seq, "heads": heads,
                      "docs": args.docs, "rows": rows}))


if __name__ == "__main__":
    main()
