"""RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * g, computed in float32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    eps: float = 1e-6
    axis_name: str = "embed"  # logical axis of the scale vector

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) with a bias: y = (x - mean) / sqrt(var + eps) * g + b, in float32 (the DSA
    indexer's key norm)."""

    eps: float = 1e-6
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape, axes = (x.shape[-1],), (self.axis_name,)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, axes), shape, jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, jnp.float32)
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
        return (y * scale + bias).astype(x.dtype)
