"""Expert-parallel MoE layer against the single-device layer, on 8 simulated CPU devices.

  python benchmarks/moe_dispatch.py [--experts 64] [--tokens 2048] [--hidden 256]

Times forward + backward of one DeepSeekMoE layer on one device and on expert-parallel meshes,
and reads from the compiled program the bytes each all-to-all moves per token (padded on CPU;
ragged collectives on TPU/GPU move only the real rows, shown as "ragged ideal"). Simulated
devices share this machine's cores, so the times show overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.moe import MoE

DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "f16": 2}


def all_to_all_bytes(hlo: str) -> list[int]:
    """Result bytes of every all-to-all in an optimized HLO module (one device's program)."""
    sizes = []
    for line in hlo.splitlines():
        if " all-to-all(" not in line:
            continue
        lhs = line.split(" all-to-all(")[0]
        for dtype, dims in re.findall(r"(f32|bf16|s32|f16)\[([0-9,]*)\]", lhs):
            sizes.append(DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1])))
    return sizes


def bench(fn, *args, reps: int = 5) -> float:
    return median_seconds(fn, *args, reps=reps, warmup=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top_k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=256)
    args = ap.parse_args()
    cfg = ModelConfig(hidden_size=args.hidden, moe_intermediate_size=args.ffn, n_routed_experts=args.experts,
                      num_experts_per_tok=args.top_k, n_group=1, topk_group=1, n_shared_experts=0,
                      initializer_range=0.02)
    x = jax.random.normal(jax.random.key(0), (8, args.tokens // 8, args.hidden))
    params = nn.meta.unbox(MoE(cfg).init(jax.random.key(1), x)["params"])

    def loss(p, x):
        y, _ = MoE(cfg).apply({"params": p}, x, mutable=["router_stats"])
        return jnp.sum(y * y)

    step = jax.jit(jax.value_and_grad(loss))
    rows = [("1 device", bench(step, params, x), None)]
    for sizes in ({"expert": 8}, {"data": 2, "expert": 4}):
        with jax.set_mesh(sharding.make_mesh(sizes)):
            compiled = step.lower(params, x).compile()
            rows.append((f"mesh {sizes}", bench(compiled, params, x), all_to_all_bytes(compiled.as_text())))

    d, k = args.hidden, args.top_k
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, hidden {d}, {args.experts} experts, top-{k}, f32")
    print(f"{'layout':<32}{'ms':>9}{'vs 1 dev':>10}{'all-to-alls':>13}{'bytes/token (padded)':>23}")
    result = {}
    for name, t, a2a in rows:
        per_token = sum(a2a) * 8 / args.tokens if a2a else 0  # 8 devices' programs
        print(f"{name:<32}{t * 1e3:>9.1f}{t / rows[0][1]:>10.2f}{len(a2a or []):>13}{per_token:>23,.0f}")
        result[name] = {"ms": t * 1e3, "all_to_alls": len(a2a or []), "bytes_per_token": per_token}
    # rows one token sends: k assignments x hidden (activations out and results back; fwd and bwd)
    print(f"ragged ideal per token per all-to-all: {k * d * 4:,} bytes (k x hidden x 4), "
          "the padded buffers carry (expert devices) x that")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
