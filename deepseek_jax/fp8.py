"""Fine-grained FP8 (V3 sec. 3.3): 1x128 activation tiles, 128x128 weight blocks, FP8 Fprop, Dgrad and Wgrad.

Quantization (sec. 3.3.2, online max-abs, E4M3 everywhere): s = amax / 448 per tile or block, q = cast_e4m3(x / s),
x ~= q * s. An all-zero tile has s = 0 and dequantizes to exact zeros. scale_fmt="ue8m0" rounds s up to a power
of two (the UE8M0 scales of V3.1), so scaling is exact in the exponent.

The GEMM promotes every N_C = 128 of K: each 128-wide block is an FP8 dot into an FP32 partial, scaled by its
a and b scales, then added in FP32 (kernels_pallas.fp8_gemm on Hopper GPUs; XLA dot_generals elsewhere).

fp8_matmul (V3 fig. 6): y = x W with
  Fprop  y  = x W      x in 1x128 tiles,   W in 128x128 blocks
  Dgrad  dx = dy W^T   dy in 1x128 tiles,  W^T: the same blocks, transposed
  Wgrad  dW = x^T dy   x^T and dy in 128x1 tiles (along the tokens)
The backward pass keeps only x's FP8 codes and 1x128 scales (sec. 3.3.3); Wgrad re-tiles them to 128x1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.backend import resolve
from kernels_pallas.fp8_gemm import BLOCK_K, check_operands, column_scales, fp8_gemm

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = BLOCK_K
SCALE_FMTS = ("fp32", "ue8m0")
K_BLOCKS_PER_DOT = 8  # the XLA path contracts up to 8 K blocks per batched dot: FP32 partials <= 8x the output


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, _cdiv(x.shape[axis], multiple) * multiple - x.shape[axis])
    return jnp.pad(x, pad)


def _scale(amax: jax.Array, scale_fmt: str) -> jax.Array:
    """s = amax / 448; UE8M0: the next power of two up (so |x| / s <= 448 still), zero stays zero."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt={scale_fmt!r}: choose one of {SCALE_FMTS}")
    s = amax / E4M3_MAX
    if scale_fmt == "ue8m0":
        mant, exp = jnp.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1)
        s = jnp.where(s > 0, jnp.ldexp(jnp.ones_like(s), jnp.where(mant == 0.5, exp - 1, exp)), 0.0)
    return s


def _encode(x: jax.Array, amax: jax.Array, scale_fmt: str) -> tuple[jax.Array, jax.Array]:
    s = _scale(amax, scale_fmt)
    q = (x / jnp.where(s > 0, s, 1.0)).astype(E4M3)
    return q, s


def quantize_activations(x: jax.Array, block: int = BLOCK, scale_fmt: str = "fp32") -> tuple[jax.Array, jax.Array]:
    """x [..., K] -> q [..., K] e4m3, s [..., ceil(K/block)] float32, 1 x block tiles on the last axis."""
    k = x.shape[-1]
    xt = _pad_to(x.astype(jnp.float32), -1, block).reshape(*x.shape[:-1], -1, block)
    q, s = _encode(xt, jnp.max(jnp.abs(xt), axis=-1, keepdims=True), scale_fmt)
    return q.reshape(*x.shape[:-1], -1)[..., :k], s[..., 0]


def quantize_weights(w: jax.Array, block: tuple[int, int] = (BLOCK, BLOCK),
                     scale_fmt: str = "fp32") -> tuple[jax.Array, jax.Array]:
    """w [..., K, N] -> q e4m3 like w, s [..., ceil(K/bk), ceil(N/bn)] float32, bk x bn blocks."""
    (bk, bn), (k, n) = block, w.shape[-2:]
    wp = _pad_to(_pad_to(w.astype(jnp.float32), -2, bk), -1, bn)
    kb, nb = wp.shape[-2] // bk, wp.shape[-1] // bn
    wb = wp.reshape(*w.shape[:-2], kb, bk, nb, bn)
    q, s = _encode(wb, jnp.max(jnp.abs(wb), axis=(-3, -1), keepdims=True), scale_fmt)
    return q.reshape(wp.shape)[..., :k, :n], s[..., :, 0, :, 0]


def dequantize_activations(q: jax.Array, s: jax.Array, block: int = BLOCK) -> jax.Array:
    """Inverse of quantize_activations: x = q * s (float32), each tile scale spread over its 1 x block tile."""
    return q.astype(jnp.float32) * jnp.repeat(s, block, axis=-1)[..., :q.shape[-1]]


def dequantize_weights(q: jax.Array, s: jax.Array, block: tuple[int, int] = (BLOCK, BLOCK),
                       dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Inverse of quantize_weights: w = q * s, each block scale spread over its bk x bn block."""
    (bk, bn), (k, n) = block, q.shape[-2:]
    full = jnp.repeat(jnp.repeat(s, bk, axis=-2), bn, axis=-1)[..., :k, :n]
    return (q.astype(jnp.float32) * full).astype(dtype)


def model_format(cfg: Any) -> str | None:
    """The scale format a ModelConfig runs its linear layers and experts in FP8 with; None: high precision."""
    return cfg.fp8_scale_fmt if cfg.fp8 else None


def stored_scales(module: Any, name: str) -> jax.Array | None:
    """The `{name}_scale_inv` blocks an FP8 checkpoint loaded with keep_fp8=True stored beside param `name`."""
    return module.get_variable("params", name + "_scale_inv") if module.has_variable("params", name + "_scale_inv") \
        else None


def stored_weight(module: Any, name: str, w: jax.Array, in_dims: int = 1, lead: int = 0) -> jax.Array:
    """A param as the model uses it: E4M3 codes kept from an FP8 checkpoint (load_hf_checkpoint with
    keep_fp8=True) are dequantized with the `{name}_scale_inv` blocks stored beside them. The block grid
    covers the kernel as a matrix [lead..., prod(in dims), prod(out dims)]."""
    scale = stored_scales(module, name)
    if scale is None:
        return w
    matrix = w.reshape(*w.shape[:lead], math.prod(w.shape[lead:lead + in_dims]), -1)
    return dequantize_weights(matrix, scale).reshape(w.shape)


# ---- the block-scaled GEMM ---------------------------------------------------------------------------------


def gemm_xla(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array, out_dtype: jnp.dtype = jnp.float32,
             k_groups: jax.Array | None = None, groups: int = 1, k_blocks_per_dot: int | None = K_BLOCKS_PER_DOT
             ) -> jax.Array:
    """The FP8 GEMM as XLA dot_generals (FP8 operands, FP32 results): operands as kernels_pallas.fp8_gemm.fp8_gemm.

    out = sum_kb (A_kb B_kb) * a_s[:, kb] b_s[kb, :] -> [M, N]. With k_groups [K/128] (ids < groups), K block kb
    adds into output group k_groups[kb] instead -> [groups, M, N] (a Wgrad whose token blocks belong to experts).
    k_blocks_per_dot=None contracts all K blocks in one batched dot (a sharded K stays a reduction for XLA SPMD)."""
    m, k, n = check_operands(a_q, a_s, b_q, b_s)
    kb = _cdiv(k, BLOCK)
    a3 = _pad_to(a_q, 1, BLOCK).reshape(m, kb, BLOCK)
    b3 = _pad_to(b_q, 0, BLOCK).reshape(kb, BLOCK, n)
    a_s, b_cols = a_s.astype(jnp.float32), column_scales(b_s, n)
    step = kb if k_blocks_per_dot is None else k_blocks_per_dot
    out = jnp.zeros((m, n) if k_groups is None else (groups, m, n), jnp.float32)
    for c in range(0, kb, step):
        blocks = slice(c, min(c + step, kb))
        part = jax.lax.dot_general(a3[:, blocks], b3[blocks], (((2,), (1,)), ((1,), (0,))),
                                   preferred_element_type=jnp.float32)  # [blocks, M, N], one FP32 sum per block
        part = part * a_s[:, blocks].T[:, :, None] * b_cols[blocks, None, :]
        out = out + jnp.sum(part, axis=0) if k_groups is None else out.at[k_groups[blocks]].add(part)
    return out.astype(out_dtype)


def gemm(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array, out_dtype: jnp.dtype = jnp.float32,
         impl: str = "auto") -> jax.Array:
    """The block-scaled FP8 GEMM: "pallas" (kernels_pallas.fp8_gemm; interpreted on CPU), "xla" (gemm_xla), or
    "auto" (backend "fp8_gemm": the kernel on CUDA GPUs with FP8 tensor cores, XLA elsewhere)."""
    if resolve("fp8_gemm", impl) == "pallas":
        return fp8_gemm(a_q, a_s, b_q, b_s, out_dtype)
    return gemm_xla(a_q, a_s, b_q, b_s, out_dtype)


# ---- fp8_matmul: Fprop, Dgrad and Wgrad in FP8 ---------------------------------------------------------------


class Gemms(NamedTuple):
    """How an FP8 linear op multiplies. fprop(xq, xs, wq, ws, aux, out_dtype) serves Fprop and (with W's blocks
    transposed) Dgrad; wgrad(x, dy, aux, scale_fmt) -> dW in float32 from the dequantized x and high-precision dy."""

    fprop: Callable
    wgrad: Callable


def _dense_fprop(xq, xs, wq, ws, aux, out_dtype, impl):
    del aux
    return gemm(xq, xs, wq, ws, out_dtype, impl)


def dense_wgrad(x: jax.Array, dy: jax.Array, aux: Any, scale_fmt: str, impl: str = "xla") -> jax.Array:
    """dW = x^T dy [K, N] with x^T and dy in 128x1 tiles along the M tokens (a GEMM contracting M)."""
    del aux
    a_q, a_s = quantize_activations(x.T, scale_fmt=scale_fmt)  # [K, M], [K, M/128]
    b_q, b_s = quantize_activations(dy.T, scale_fmt=scale_fmt)  # [N, M], [N, M/128]
    if impl == "xla":
        return gemm_xla(a_q, a_s, b_q.T, b_s.T, k_blocks_per_dot=None)  # M is the (data-sharded) batch
    return gemm(a_q, a_s, b_q.T, b_s.T, jnp.float32, impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def fp8_linear(x: jax.Array, w: jax.Array, w_scale: jax.Array | None, aux: Any, gemms: Gemms,
               scale_fmt: str) -> jax.Array:
    """x [M, K] times w [..., K, N] through `gemms`; w_scale given: w holds E4M3 codes with those block scales
    (no weight gradient), else w is quantized here. aux (e.g. group sizes) goes to the gemms."""
    return _fprop(x, w, w_scale, aux, gemms, scale_fmt)[0]


def _fprop(x, w, w_scale, aux, gemms, scale_fmt):
    xq, xs = quantize_activations(x, scale_fmt=scale_fmt)
    wq, ws = (w, w_scale) if w_scale is not None else quantize_weights(w, scale_fmt=scale_fmt)
    y = gemms.fprop(xq, xs, wq, ws, aux, x.dtype)
    # saved for the backward pass: the FP8 codes and scales of x (not x itself) and of W; w_like carries W's dtype,
    # or is None (statically) for checkpoint codes, which get no gradient
    return y, (xq, xs, wq, ws, aux, jnp.zeros((0,), w.dtype) if w_scale is None else None)


def _bprop(gemms, scale_fmt, res, dy):
    xq, xs, wq, ws, aux, w_like = res
    dyq, dys = quantize_activations(dy, scale_fmt=scale_fmt)
    dx = gemms.fprop(dyq, dys, jnp.swapaxes(wq, -1, -2), jnp.swapaxes(ws, -1, -2), aux, dy.dtype)  # y had x's dtype
    if w_like is None:
        return dx, None, None, None
    dw = gemms.wgrad(dequantize_activations(xq, xs), dy, aux, scale_fmt)
    return dx, dw.astype(w_like.dtype), None, None


fp8_linear.defvjp(_fprop, _bprop)


def dense_gemms(impl: str = "auto") -> Gemms:
    return _dense_gemms(resolve("fp8_gemm", impl))


@functools.cache
def _dense_gemms(impl: str) -> Gemms:
    return Gemms(functools.partial(_dense_fprop, impl=impl), functools.partial(dense_wgrad, impl=impl))


def fp8_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array | None = None, *, scale_fmt: str = "fp32",
               impl: str = "auto") -> jax.Array:
    """x [..., K] times w [K, N] -> [..., N] in x's dtype: quantize both, FP8 GEMM with FP32 accumulation.

    Differentiable: Fprop, Dgrad and Wgrad are FP8 GEMMs (V3 fig. 6). w_scale [ceil(K/128), ceil(N/128)]: w holds
    E4M3 codes already (an FP8 checkpoint), used as they are; x alone then gets a gradient."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_matmul: x {x.shape} [..., K] and w {w.shape} [K, N] do not contract")
    y = fp8_linear(x.reshape(-1, x.shape[-1]), w, w_scale, None, dense_gemms(impl), scale_fmt)
    return y.reshape(*x.shape[:-1], w.shape[1])
