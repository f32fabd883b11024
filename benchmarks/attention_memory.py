"""Training attention at long sequence on CPU: peak memory and step time of the tiny config at seq 4096.

One forward + backward (value_and_grad of the next-token cross-entropy, no optimizer) of configs/tiny.py's model
at batch 1 x seq 4096 (`--seq`), in float32: XLA's compiled temporary bytes (the step's peak scratch memory), the
process's peak RSS, and the median step time. The attention path is the jnp one (`attention_impl=xla`, the CPU
default); run it from two checkouts to compare them:

  python benchmarks/attention_memory.py [--seq 4096] [--chunk 1024]          # this checkout
  PYTHONPATH=/path/to/other/checkout python /path/to/other/checkout/benchmarks/attention_memory.py

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp

import deepseek_jax as dsj
from configs import model_config, tiny


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None, help="attention_chunk (default: the config's)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="other ModelConfig overrides")
    args = ap.parse_args()
    config = tiny.get_config()
    config.model.max_position_embeddings = args.seq
    if args.chunk is not None:
        config.model.attention_chunk = args.chunk
    for item in args.set:
        key, value = item.split("=", 1)
        config.model[key] = type(config.model[key])(value)
    cfg = model_config(config)
    params = dsj.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, cfg.vocab_size, jnp.int32)

    def loss(p, toks):
        logits = dsj.forward(cfg, p, toks[:, :-1]).logits
        picked = jnp.take_along_axis(logits, toks[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params, tokens))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, tokens))
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"benchmark": "attention_memory", "seq": args.seq, "batch": args.batch,
           "attention_chunk": cfg.attention_chunk, "xla_temp_mib": temp / 2**20, "peak_rss_mib": rss / 2**20,
           "step_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}
    print(f"seq {args.seq} x batch {args.batch}, attention_chunk {cfg.attention_chunk}: XLA temporaries "
          f"{out['xla_temp_mib']:.0f} MiB, peak RSS {out['peak_rss_mib']:.0f} MiB, step {out['step_ms']:.0f} ms "
          f"(min {out['min_ms']:.0f})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
