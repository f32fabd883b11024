"""Compile the real train step ahead of time for a TPU topology, from a CPU machine.

  python -m launch.compile --config=configs/v3_671b.py --topology=v5p-512 [--config.key=value ...]

Needs libtpu (pip install -e ".[tpu]") for TPU topologies; --topology=cpu compiles for this
machine's devices instead. Nothing is allocated: params, optimizer state and batch are abstract
arrays carrying their shardings. Prints per-device memory and FLOPs, and as its last line a JSON
object with per_device_bytes and flops_per_step.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from configs import DEFAULT_CONFIG, validate
from deepseek_jax import backend, sharding
from deepseek_jax.config import ConfigError
from deepseek_jax.metrics import flops_per_token, param_counts
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import abstract_state, check_batch, make_train_step

# TPU slices by name: TensorCores for v4/v5p (2 per chip, one JAX device per chip), chips for v5e/v6e
CUBE = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8",
        1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16", 6144: "8x16x24", 8192: "16x16x16", 12288: "16x16x24"}
PLANE = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GENERATIONS = {"v4": ("v4", CUBE), "v5p": ("v5p", CUBE), "v5e": ("v5e", PLANE), "v5litepod": ("v5e", PLANE),
               "v6e": ("v6e", PLANE)}
HBM_GIB = {"v4": 32.0, "v5p": 95.74, "v5e": 16.0, "v6e": 32.0}  # per chip, as XLA reports it usable (v5p: "95 GB")


def topology_devices(name: str) -> tuple[list, float | None]:
    """Devices of a named TPU slice (e.g. v5p-512) or of this machine (cpu); and HBM GiB per device."""
    if name == "cpu":
        return jax.devices(), None
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not m or int(m.group(2)) not in GENERATIONS[m.group(1)][1]:
        raise ConfigError(f"--topology={name!r}: use cpu or a TPU slice like v5p-512, v4-128, v5e-256, v6e-64 "
                          f"(v4/v5p sizes {sorted(CUBE)}; v5e/v6e sizes {sorted(PLANE)})")
    gen, shapes = GENERATIONS[m.group(1)]
    # libtpu probes for a local TPU when it loads; describe the target instead of this host
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(f"{gen}:{shapes[int(m.group(2))]}", "tpu")
    except Exception as e:  # no libtpu, or it refuses the slice
        raise ConfigError(f"cannot describe TPU topology {name} ({e}); install libtpu with "
                          'pip install -e ".[tpu]"') from e
    return list(topo.devices), HBM_GIB[gen]


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _shape_bytes(text: str) -> list[int]:
    return [_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for t, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", text)]


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each device's collectives produce in one run of a compiled HLO module, by kind: every collective's
    result (the output of an async -start), times the trip counts of the while loops around it (scan bodies)."""
    comps, current, calls = {}, None, collections.defaultdict(list)
    entry = None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = header.group(2)
            comps[current] = collections.Counter()
            entry = current if header.group(1) else entry
            continue
        m = re.match(r"^\s+(?:ROOT )?%\S+ = (.+?) ([a-z\-]+)\(", line)
        if current is None or not m:
            continue
        shape, op = m.groups()
        kind = op.removesuffix("-start")
        if kind in COLLECTIVES and not op.endswith("-done"):
            comps[current][kind] += max(_shape_bytes(shape), default=0)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        for callee in re.findall(r"(?:calls|body)=%([\w.\-]+)", line):
            calls[current].append((callee, int(trips.group(1)) if trips and op == "while" else 1))
        for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
            calls[current] += [(c.strip().lstrip("%"), 1) for c in group.split(",")]

    def total(name: str, seen: tuple = ()) -> collections.Counter:
        out = collections.Counter(comps.get(name, {}))
        for callee, n in calls[name]:
            if callee not in seen:
                for k, v in total(callee, (*seen, name)).items():
                    out[k] += n * v
        return out

    return dict(total(entry)) if entry else {}


def compile_train_step(config: ml_collections.ConfigDict, devices: list) -> dict:
    """Lower and compile the train step over `devices`; returns the memory and cost figures."""
    cfg = validate(config)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    rules = check_batch(config, mesh)
    tx, schedule = make_optimizer(config.optim, config.steps)
    state = abstract_state(cfg, tx, mesh, offload=config.optim.offload)
    rows, length = config.data.batch_size, config.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding.batch_sharding(mesh, rules))
             for k in ("tokens", "positions", "segment_ids")}
    step = make_train_step(config, cfg, tx, schedule)
    start = time.time()
    # "auto" settings resolve for the chips compiled for, not for this host
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), backend.compiling_for(devices[0].platform):
        state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        lowered = jax.jit(step, donate_argnums=0, out_shardings=(state_sh, None)).lower(state, batch)
        compiled = lowered.compile()
    seconds = time.time() - start
    collectives = collective_bytes(compiled.as_text())
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    args, out, temp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias = getattr(mem, "alias_size_in_bytes", 0)
    per_device = args + out - alias + temp  # HBM; host-offloaded state (optim.offload) is counted apart
    return {
        "devices": len(devices), "mesh": dict(mesh.shape), "compile_seconds": round(seconds, 1),
        "argument_bytes": args, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
        "per_device_bytes": per_device, "host_argument_bytes": getattr(mem, "host_argument_size_in_bytes", 0),
        # XLA's cost analysis counts a scan body once, not per layer: the model count is the step's FLOPs
        "flops_per_step": flops_per_token(cfg, length) * rows * length,
        "xla_flops_per_step": float(cost.get("flops", 0.0)) * len(devices),
        "params": param_counts(cfg)["total"],
        "collective_bytes_per_step": sum(collectives.values()), "collectives": collectives,
        "context_parallel": sharding.length_shards_of(rules, mesh),
    }


def compile_serve_step(config: ml_collections.ConfigDict, devices: list, rows: int, num_pages: int,
                       page_size: int = 64, context: int = 32768) -> dict:
    """Lower and compile the serving engine's decode step (serve.engine: one token for `rows` slots over a paged
    latent cache of num_pages pages) over `devices`, in bf16: params sharded by the training rules table, slots
    and pages over the batch axes. Returns the memory figures, per page too."""
    from deepseek_jax.model import abstract_params
    from deepseek_jax.serve import engine

    cfg = validate(config).replace(dtype="bfloat16", num_nextn_predict_layers=0)
    mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    rules = sharding.rules_for(mesh, rows)
    boxed = abstract_params(cfg)
    sharding.check_divisible(boxed, mesh)
    params = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=sh),
                                    nn.meta.unbox(boxed), sharding.logical_shardings(mesh, boxed))
    slots = sharding.batch_sharding(mesh, rules).spec[0]  # slots (and pages) over the batch axes

    def on(shape: tuple, dtype: Any, dim: int = 0) -> jax.ShapeDtypeStruct:
        spec = [None] * len(shape)
        spec[dim] = slots
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, P(*spec)))

    pool = jax.eval_shape(lambda: tuple(engine._empty_pool(cfg, count, num_pages, page_size, jnp.bfloat16)
                                        for _, _, count in cfg.layer_segments))
    pool = jax.tree_util.tree_map(lambda x: on(x.shape, x.dtype, dim=1), pool)  # [layers, pages, ...]
    dev = engine.Device(pool, (), on((rows, 0), jnp.int32), on((rows, 0, cfg.vocab_size), jnp.float32))
    i32 = on((rows,), jnp.int32)
    sampling = (on((rows,), jnp.float32), i32, on((rows,), jnp.float32), on((rows,), jnp.uint32), i32)
    args = (params, dev, i32, on((rows, context // page_size), jnp.int32), i32, i32, sampling)
    start = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), backend.compiling_for(devices[0].platform):
        step = jax.jit(engine.decode_step, static_argnames=("cfg", "kv_len"), donate_argnums=1)
        compiled = step.lower(*args, cfg=cfg, kv_len=context).compile()
    mem = compiled.memory_analysis()
    argb, out, temp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias = getattr(mem, "alias_size_in_bytes", 0)
    pool_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(pool))
    return {"devices": len(devices), "mesh": dict(mesh.shape), "rows": rows, "num_pages": num_pages,
            "compile_seconds": round(time.time() - start, 1), "argument_bytes": argb, "temp_bytes": temp,
            "per_device_bytes": argb + out - alias + temp, "pool_bytes": pool_bytes,
            "cache_bytes_per_token": pool_bytes // (num_pages * page_size)}


FLAGS = flags.FLAGS


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "ml-collections config file", lock_config=True)
    flags.DEFINE_string("topology", "cpu", "TPU slice (v5p-512, v4-128, v5e-256, ...) or cpu")
    flags.DEFINE_bool("serve", False, "compile the serving engine's decode step over a paged cache instead")
    flags.DEFINE_integer("serve_rows", 0, "decode slots (default: one per batch shard)")
    flags.DEFINE_integer("serve_pages", 0, "64-token cache pages (default: serve_rows full contexts)")
    flags.DEFINE_integer("serve_context", 32768, "tokens per sequence")


def serve_main(devices: list, hbm_gib: float | None) -> None:
    """Compile the decode step at --serve_rows slots of serve_context tokens each; without --serve_rows (and on a
    TPU slice), find the most slots that fit: a first compile bounds it (HBM left after everything but the pool,
    over one sequence's pages), then a bisection over multiples of the batch shards compiles each candidate, since
    the temporaries also grow with the slots."""
    config = FLAGS.config
    shards = math.prod(sharding.make_mesh(config.mesh.to_dict(), devices).shape[a] for a in sharding.BATCH_AXES
                       if a in config.mesh)
    per_seq_pages, gib = FLAGS.serve_context // 64, 2**30

    def attempt(rows: int) -> dict | None:
        try:
            r = compile_serve_step(config, devices, rows, FLAGS.serve_pages or rows * per_seq_pages,
                                   context=FLAGS.serve_context)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"{rows} slots: does not fit ({str(e).splitlines()[0][:160]})")
            return None
        fits = hbm_gib is None or r["per_device_bytes"] <= hbm_gib * gib
        print(f"{rows} slots x {FLAGS.serve_context} tokens ({r['num_pages']} pages): {r['per_device_bytes'] / gib:.2f}"
              f" GiB per device{'' if hbm_gib is None else f' of {hbm_gib}'}, compiled in {r['compile_seconds']:.0f}s"
              + ("" if fits else ": does not fit"))
        return r if fits else None

    rows = FLAGS.serve_rows or shards
    best = attempt(rows)
    if best and not FLAGS.serve_rows and hbm_gib is not None:
        pool_dev = best["pool_bytes"] / shards  # pages split over the batch shards, replicated over the rest
        seq_dev = per_seq_pages * 64 * best["cache_bytes_per_token"] / shards
        bound = int((hbm_gib * gib - (best["per_device_bytes"] - pool_dev)) // seq_dev) // shards * shards
        lo, hi = rows, bound + shards  # lo fits; hi is known not to (or is past the bound)
        while hi - lo > shards:
            mid = (lo + hi) // 2 // shards * shards
            r = attempt(mid)
            lo, hi, best = (mid, hi, r) if r else (lo, mid, best)
    if best is None:
        sys.exit(f"error: {rows} slots of {FLAGS.serve_context} tokens do not fit; lower --serve_rows")
    print(f"topology {FLAGS.topology}: {best['devices']} devices, mesh {best['mesh']}; the decode step "
          f"holds {best['rows']} concurrent {FLAGS.serve_context}-token sequences ({best['num_pages']} pages, "
          f"{best['cache_bytes_per_token']:,} B per token), {best['per_device_bytes'] / gib:.2f} GiB per device")
    print(json.dumps(best))


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        devices, hbm_gib = topology_devices(FLAGS.topology)
        if FLAGS.serve:
            return serve_main(devices, hbm_gib)
        r = compile_train_step(FLAGS.config, devices)
    except (ConfigError, sharding.MeshError) as e:
        sys.exit(f"error: {e}")
    gib = 2**30
    print(f"topology {FLAGS.topology}: {r['devices']} devices, mesh {r['mesh']}, "
          f"{r['params'] / 1e9:.1f}B params, compiled in {r['compile_seconds']:.0f}s")
    print(f"per device: arguments {r['argument_bytes'] / gib:.2f} GiB, outputs {r['output_bytes'] / gib:.2f} GiB "
          f"(aliased {r['alias_bytes'] / gib:.2f} GiB), temporaries {r['temp_bytes'] / gib:.2f} GiB "
          f"-> {r['per_device_bytes'] / gib:.2f} GiB ({r['per_device_bytes'] / 1e9:.2f} GB)"
          + (f" of {hbm_gib} GiB HBM" if hbm_gib else "")
          + (f"; in host memory {r['host_argument_bytes'] / gib:.2f} GiB" if r["host_argument_bytes"] else ""))
    print(f"FLOPs per step: {r['flops_per_step']:.3e} (model: 6N + attention, activated experts); "
          f"XLA counts {r['xla_flops_per_step']:.3e} with each scan body once")
    kinds = ", ".join(f"{k} {v / gib:.2f}" for k, v in sorted(r["collectives"].items(), key=lambda kv: -kv[1]))
    print(f"collectives per device per step: {r['collective_bytes_per_step'] / gib:.2f} GiB ({kinds})"
          + (f"; sequence split {r['context_parallel']} ways (context parallel)" if r["context_parallel"] > 1 else ""))
    if hbm_gib is not None:
        fits = r["per_device_bytes"] <= hbm_gib * gib
        print(f"fits in {hbm_gib} GiB per chip: {'yes' if fits else 'NO'} "
              f"({math.ceil(100 * r['per_device_bytes'] / (hbm_gib * gib))}%)")
    print(json.dumps(r))


if __name__ == "__main__":
    define_flags()
    app.run(main)
