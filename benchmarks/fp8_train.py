"""FP8 training accuracy (V3 sec. 3.3): the same run with model.fp8=True and without, and the loss-gap curve.

  python benchmarks/fp8_train.py [--config configs/tiny.py] [--steps 300] [--log_every 10] [--ue8m0] [--out DIR]
  python benchmarks/fp8_train.py --memory_only

Two (three with --ue8m0: power-of-two scales) runs of deepseek_jax.train.loop.train_lm, same seed, steps and data;
for each logged step the relative gap |L_fp8 - L_ref| / L_ref of the training loss, reported as start / end / max,
and the gap of the held-out loss at the end. The reference is the config's own precision (tiny: float32 on CPU;
small_moe: bf16 on a GPU, V3's comparison). Default config: small_moe.py on an accelerator, tiny.py on CPU.

Memory: what one layer keeps for its backward pass. Per linear layer, the input is saved as E4M3 codes plus one
FP32 scale per 1x128 tile (V3 sec. 3.3.3) instead of in the compute dtype. For a whole block (MLA + MoE) and a dense
SwiGLU layer at the config's dims and batch: the non-weight VJP residuals, and XLA's temporaries of the compiled
forward+backward (compiled for this host, not run; XLA:CPU widens FP8 dot operands to FP32, so on CPU the
temporaries grow).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import fp8
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.rope import rope_cos_sin
from deepseek_jax.model import Block, attention_mask
from deepseek_jax.train.loop import train_lm
from deepseek_jax.train.start import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str):
    """get_config() of a config file, as launch.train's --config reads it."""
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def loss_curves(config, steps: int, log_every: int, out: str, variants: dict[str, dict]) -> dict[str, list[dict]]:
    """Train `config` once per variant (model field overrides), same seed and data; the logged metrics of each."""
    runs = {}
    for name, model in variants.items():
        c = config.copy_and_resolve_references()
        c.steps, c.log_every, c.eval_every, c.checkpoint_every = steps, log_every, steps, steps
        for key, value in model.items():
            c.model[key] = value
        t = time.time()
        runs[name] = train_lm(c, os.path.join(out, name))
        print(f"{name}: {steps} steps in {time.time() - t:.0f} s, loss {runs[name][0]['loss']:.4f} -> "
              f"{runs[name][-1]['loss']:.4f}", file=sys.stderr)
    return runs


def gap_curve(ref: list[dict], low: list[dict]) -> dict:
    steps = [m["step"] for m in ref]
    a, b = np.array([m["loss"] for m in ref]), np.array([m["loss"] for m in low])
    gap = np.abs(b - a) / a
    return {"steps": steps, "loss_ref": a.tolist(), "loss_fp8": b.tolist(), "gap": gap.tolist(),
            "gap_start": float(gap[0]), "gap_end": float(gap[-1]), "gap_max": float(gap.max()),
            "gap_max_step": int(steps[int(gap.argmax())]),
            "eval_gap_end": abs(low[-1]["eval_loss"] - ref[-1]["eval_loss"]) / ref[-1]["eval_loss"]}


def linear_saved_bytes(tokens: int, k: int, dtype: str) -> dict:
    """Bytes a linear layer keeps of its input x [tokens, k] for the backward pass: E4M3 codes + 1x128 scales
    (measured on fp8_matmul's VJP residuals) against x in `dtype`."""
    x = jax.ShapeDtypeStruct((tokens, k), jnp.dtype(dtype))
    res = jax.eval_shape(lambda x: jax.vjp(lambda x: fp8.fp8_matmul(x, jnp.zeros((k, 128))), x)[1], x)
    saved = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(res) if a.shape[0] == tokens)
    return {"fp8": saved, "ref": tokens * k * jnp.dtype(dtype).itemsize}


def layer_bytes(cfg, module_fn, batch: int, length: int) -> dict:
    """One layer at x [batch, length, hidden]: `saved`, the bytes of the VJP residuals that are not weights (what
    the forward pass leaves for the backward, as JAX traces it: a value two layers quantize is counted twice,
    which XLA's CSE merges in a jitted step); `xla_temp`, XLA's temporaries of the compiled forward+backward."""
    dtype = jnp.dtype(cfg.dtype)
    x = jax.ShapeDtypeStruct((batch, length, cfg.hidden_size), dtype)
    module = module_fn(cfg)
    params = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), jnp.zeros((1, 8, cfg.hidden_size),
                                                                                              dtype))["params"]))

    def forward(p, x):
        return module.apply({"params": p}, x, mutable=["router_stats"])[0]

    weights = {a.shape for a in jax.tree_util.tree_leaves(params)}
    res = jax.tree_util.tree_leaves(jax.eval_shape(lambda p, x: jax.vjp(forward, p, x)[1], params, x))
    saved = sum(a.size * a.dtype.itemsize for a in res if a.shape not in weights)
    loss = lambda p, x: jnp.sum(forward(p, x).astype(jnp.float32) ** 2)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return {"saved": int(saved), "xla_temp": int(compiled.memory_analysis().temp_size_in_bytes)}


class _BlockOnly(nn.Module):
    """A decoder block (MLA + MoE) on x alone: positions 0..T-1, one document."""

    cfg: object

    @nn.compact
    def __call__(self, x):
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        cos, sin = rope_cos_sin(self.cfg, positions)
        mask = attention_mask(jnp.ones(x.shape[:2], jnp.int32))
        return Block(self.cfg, moe=True, name="block")(x, cos, sin, mask)[0]


def memory_figures(cfg, batch: int, length: int) -> dict:
    tokens = batch * length
    out = {"tokens": tokens, "linear": linear_saved_bytes(tokens, cfg.hidden_size, cfg.dtype)}
    layers = {"moe_block": lambda c: _BlockOnly(c),
              "dense_mlp": lambda c: MLP(c.intermediate_size, jnp.dtype(c.dtype), c.initializer_range,
                                         fp8.model_format(c))}
    for name, fn in layers.items():
        out[name] = {k: layer_bytes(cfg.replace(fp8=f), fn, batch, length) for k, f in (("ref", False), ("fp8", True))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="default: configs/small_moe.py on GPU/TPU, configs/tiny.py on CPU")
    ap.add_argument("--steps", type=int, default=None, help="default: the config's")
    ap.add_argument("--log_every", type=int, default=10)
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--ue8m0", action="store_true", help="a third run with power-of-two (UE8M0) scales")
    ap.add_argument("--memory_only", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    accel = jax.default_backend() != "cpu"
    path = args.config or os.path.join(ROOT, "configs", "small_moe.py" if accel else "tiny.py")
    config = load_config(path)
    if args.batch_size:
        config.data.batch_size = args.batch_size
    cfg = model_config(config)
    result = {"config": os.path.relpath(path, ROOT), "device": jax.devices()[0].device_kind, "dtype": cfg.dtype}

    mem = memory_figures(cfg, config.data.batch_size, config.data.seq_len)
    lin = mem["linear"]
    print(f"saved input of a linear layer, {mem['tokens']} tokens x {cfg.hidden_size}: {lin['ref'] / 2**20:.1f} MiB "
          f"in {cfg.dtype} -> {lin['fp8'] / 2**20:.1f} MiB as E4M3 + 1x128 scales ({lin['fp8'] / lin['ref']:.1%})")
    for name in ("moe_block", "dense_mlp"):
        ref, low = mem[name]["ref"], mem[name]["fp8"]
        print(f"{name}: saved for backward {ref['saved'] / 2**20:.1f} MiB -> {low['saved'] / 2**20:.1f} MiB in FP8 "
              f"({low['saved'] / ref['saved'] - 1:+.1%}); XLA temporaries of the compiled forward+backward on "
              f"{jax.default_backend()} {ref['xla_temp'] / 2**20:.1f} -> {low['xla_temp'] / 2**20:.1f} MiB "
              f"({low['xla_temp'] / ref['xla_temp'] - 1:+.1%})")
    result["memory"] = mem

    if not args.memory_only:
        steps = args.steps or config.steps
        out = args.out or tempfile.mkdtemp(prefix="fp8_train_")
        variants = {"ref": {"fp8": False}, "fp8": {"fp8": True}}
        if args.ue8m0:
            variants["fp8_ue8m0"] = {"fp8": True, "fp8_scale_fmt": "ue8m0"}
        runs = loss_curves(config, steps, args.log_every, out, variants)
        for name in variants:
            if name == "ref":
                continue
            curve = gap_curve(runs["ref"], runs[name])
            result[name] = curve
            print(f"{name} vs {cfg.dtype}: loss gap start {curve['gap_start']:.3%}, end {curve['gap_end']:.3%}, "
                  f"max {curve['gap_max']:.3%} (step {curve['gap_max_step']}); held-out loss gap at the end "
                  f"{curve['eval_gap_end']:.3%}")
        print("step " + " ".join(f"{s:>7}" for s in result["fp8"]["steps"]))
        print("gap  " + " ".join(f"{g:7.3%}" for g in result["fp8"]["gap"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
