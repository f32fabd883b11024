"""Rotary embeddings on interleaved pairs (x0,x1),(x2,x3),... with YaRN (V2 appendix B.1).

Only MLA's decoupled rope dims are rotated. The V3.2 lightning indexer rotates halves instead, (x_i, x_{i+d/2}),
with the same frequencies. YaRN blends interpolated and original frequencies
with a linear ramp between the correction dims of beta_fast and beta_slow, and scales cos/sin
by mscale(factor, mscale) / mscale(factor, mscale_all_dim).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig, yarn_mscale


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """theta_i = base^(-2i/d) for i < d/2, YaRN-blended when rope_type is yarn."""
    d = cfg.qk_rope_head_dim
    freq = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if not cfg.yarn:
        return freq.astype(np.float32)

    def correction_dim(n_rot: float) -> float:  # dim at which a wavelength spans n_rot turns
        turns = cfg.original_max_position_embeddings / (n_rot * 2 * math.pi)
        return d * math.log(turns) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1 for high-frequency dims, kept as is
    freq = freq / cfg.rope_factor * (1.0 - extrapolate) + freq * extrapolate
    return freq.astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [batch, length] -> cos, sin [batch, length, d_rope / 2] (float32)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(cfg))
    m = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) if cfg.yarn else 1.0
    return jnp.cos(angles) * m, jnp.sin(angles) * m


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs. x [batch, length, heads, d]; cos/sin [batch, length, d/2]."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def apply_rope_halves(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the pairs (x_i, x_{i + d/2}) by frequency i (rotate_half, the DSA indexer's layout). x [batch, length,
    heads, d]; cos/sin [batch, length, d/2]."""
    x32 = x.astype(jnp.float32)
    x0, x1 = x32[..., : x.shape[-1] // 2], x32[..., x.shape[-1] // 2:]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).astype(x.dtype)
