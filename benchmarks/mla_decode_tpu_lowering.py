"""Lower and compile kernels_pallas.mla_decode for a TPU, on a machine without one (DeepSeek-V3 decode shapes).

  /opt/tpuvenv/bin/python benchmarks/mla_decode_tpu_lowering.py [--topology v5p:2x2x1] [--batch 64] [--context 4096]
  /opt/tpuvenv/bin/python benchmarks/mla_decode_tpu_lowering.py --sparse   # the DSA kernel, top-2048 of 32k (V3.2)
  /opt/tpuvenv/bin/python benchmarks/mla_decode_tpu_lowering.py --paged    # through a page table, 64-token pages

Needs jax[tpu] (libtpu) in the running environment; only jax and numpy are imported, so a bare venv works:
python -m venv /opt/tpuvenv && /opt/tpuvenv/bin/pip install "jax[tpu]==0.10.2" numpy. As launch/compile.py does,
the target slice is described to libtpu (no local TPU is probed) and the kernel is compiled for one of its
devices, for a 3-D query [B, 128, 512] and a 4-D one [B, 2, 128, 512] (speculative verification), bf16 cache.
Prints per-case memory and FLOPs from the compiled program and, as its last line, a JSON object of the figures.
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

from kernels_pallas.mla_decode import mla_decode
from kernels_pallas.mla_sparse_decode import mla_sparse_decode

HEADS, LATENT, ROPE = 128, 512, 64  # DeepSeek-V3: num_attention_heads, kv_lora_rank, qk_rope_head_dim
TOPK = 2048  # DeepSeek-V3.2: index_topk


def tpu_device(topology: str) -> jax.Device:
    """First device of a described (not attached) TPU slice, e.g. v5p:2x2x1."""
    gen, shape = topology.split(":")
    chips = 1
    for d in shape.split("x"):
        chips *= int(d)
    # libtpu probes for a local TPU when it loads; describe the target instead of this host
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{gen}-{chips * (2 if gen in ('v4', 'v5p') else 1)}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology, "tpu").devices[0]


PAGE = 64  # FlashMLA's block size, the serving engine's page


def compile_case(device: jax.Device, batch: int, queries: int, context: int, sparse: bool = False,
                 paged: bool = False) -> dict:
    sharding = jax.sharding.SingleDeviceSharding(device)
    q_shape = (batch, HEADS) if queries == 1 else (batch, queries, HEADS)
    rows = (batch * context // PAGE, PAGE) if paged else (batch, context)  # a pool of pages, or a row each
    shapes = [((*q_shape, LATENT), jnp.bfloat16), ((*q_shape, ROPE), jnp.bfloat16),
              ((*rows, LATENT), jnp.bfloat16), ((*rows, ROPE), jnp.bfloat16)]
    shapes.append(((*q_shape[:-1], TOPK), jnp.int32) if sparse else ((batch,), jnp.int32))
    if paged:
        shapes.append(((batch, context // PAGE), jnp.int32))
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    kernel = mla_sparse_decode if sparse else mla_decode
    f = functools.partial(kernel, softmax_scale=(LATENT // 4 + ROPE) ** -0.5, interpret=False)
    if paged:
        f = functools.partial(lambda *a, f: f(*a[:5], page_table=a[5]), f=f)
    lowered = jax.jit(f, in_shardings=sharding, out_shardings=sharding).lower(*args)
    text = lowered.as_text()
    compiled = lowered.compile()
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"query": list(q_shape), "context": context, "sparse": sparse, "paged": paged,
            "tpu_custom_call": "tpu_custom_call" in text,
            "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes, "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=None, help="cache length (default 4096; 32768 with --sparse)")
    ap.add_argument("--sparse", action="store_true", help="the DSA kernel, kernels_pallas.mla_sparse_decode")
    ap.add_argument("--paged", action="store_true", help="the cache as 64-token pages read through a page table")
    args = ap.parse_args()
    device = tpu_device(args.topology)
    context = args.context or (32768 if args.sparse else 4096)
    cases = [compile_case(device, args.batch, t, context, args.sparse, args.paged) for t in (1, 2)]
    for c in cases:
        print(f"{device.device_kind} q {c['query']} x L={c['context']}: compiled; arguments "
              f"{c['argument_bytes'] / 2**20:.1f} MiB, output {c['output_bytes'] / 2**20:.1f} MiB, "
              f"temporaries {c['temp_bytes'] / 2**20:.1f} MiB, {c['flops']:.3e} FLOPs, "
              f"{c['bytes_accessed'] / 2**20:.1f} MiB accessed (XLA's count)")
    print(json.dumps({"device_kind": device.device_kind, "topology": args.topology, "cases": cases}))


if __name__ == "__main__":
    main()
