"""Fine-grained FP8 quantization (V3 sec. 3.3.1): 1x128 activation tiles, 128x128 weight blocks.

Online max-abs scaling with E4M3 codes: s = amax / 448 per tile or block, q = cast_e4m3(x / s),
and x ~= q * s. An all-zero tile has s = 0 and dequantizes to exact zeros.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, _cdiv(x.shape[axis], multiple) * multiple - x.shape[axis])
    return jnp.pad(x, pad)


def _encode(x: jax.Array, amax: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = amax / E4M3_MAX
    q = (x / jnp.where(s > 0, s, 1.0)).astype(E4M3)
    return q, s


def quantize_activations(x: jax.Array, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """x [..., K] -> q [..., K] e4m3, s [..., ceil(K/block)] float32, 1 x block tiles on the last axis."""
    k = x.shape[-1]
    xt = _pad_to(x.astype(jnp.float32), -1, block).reshape(*x.shape[:-1], -1, block)
    q, s = _encode(xt, jnp.max(jnp.abs(xt), axis=-1, keepdims=True))
    return q.reshape(*x.shape[:-1], -1)[..., :k], s[..., 0]


def quantize_weights(w: jax.Array, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[jax.Array, jax.Array]:
    """w [..., K, N] -> q e4m3 like w, s [..., ceil(K/bk), ceil(N/bn)] float32, bk x bn blocks."""
    (bk, bn), (k, n) = block, w.shape[-2:]
    wp = _pad_to(_pad_to(w.astype(jnp.float32), -2, bk), -1, bn)
    kb, nb = wp.shape[-2] // bk, wp.shape[-1] // bn
    wb = wp.reshape(*w.shape[:-2], kb, bk, nb, bn)
    q, s = _encode(wb, jnp.max(jnp.abs(wb), axis=(-3, -1), keepdims=True))
    return q.reshape(wp.shape)[..., :k, :n], s[..., :, 0, :, 0]


def stored_weight(module: Any, name: str, w: jax.Array, in_dims: int = 1, lead: int = 0) -> jax.Array:
    """A param as the model uses it: E4M3 codes kept from an FP8 checkpoint (load_hf_checkpoint with
    keep_fp8=True) are dequantized with the `{name}_scale_inv` blocks stored beside them. The block grid
    covers the kernel as a matrix [lead..., prod(in dims), prod(out dims)]."""
    if not module.has_variable("params", name + "_scale_inv"):
        return w
    scale = module.get_variable("params", name + "_scale_inv")
    matrix = w.reshape(*w.shape[:lead], math.prod(w.shape[lead:lead + in_dims]), -1)
    return dequantize_weights(matrix, scale).reshape(w.shape)


def dequantize_weights(q: jax.Array, s: jax.Array, block: tuple[int, int] = (BLOCK, BLOCK),
                       dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Inverse of quantize_weights: w = q * s, each block scale spread over its bk x bn block."""
    (bk, bn), (k, n) = block, q.shape[-2:]
    full = jnp.repeat(jnp.repeat(s, bk, axis=-2), bn, axis=-1)[..., :k, :n]
    return (q.astype(jnp.float32) * full).astype(dtype)
