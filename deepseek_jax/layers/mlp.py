"""SwiGLU feed-forward (Shazeer 2020): FFN(x) = W_down (SiLU(W_gate x) * W_up x)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.layers.linear import Linear


class MLP(nn.Module):
    hidden: int
    dtype: jnp.dtype = jnp.float32
    init_std: float = 0.006
    fp8: str | None = None  # FP8 scale format of the three projections (Linear.fp8); None: high precision

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, init_std=self.init_std, fp8=self.fp8)
        gate = Linear(self.hidden, ("embed", "mlp"), name="gate", **kw)(x)
        up = Linear(self.hidden, ("embed", "mlp"), name="up", **kw)(x)
        return Linear(x.shape[-1], ("mlp", "embed"), name="down", **kw)(nn.silu(gate) * up)
