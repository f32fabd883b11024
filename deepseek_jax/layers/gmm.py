"""Grouped matmul for dropless MoE: rows sorted by expert, each group times its own weight.

`ragged` calls jax.lax.ragged_dot, native on GPU and TPU. XLA:CPU lowers ragged_dot to a
dense product per group (cost grows with the number of groups), so `tiled` is the CPU path:
each group is padded to whole row tiles, every tile belongs to one group, and one batched
matmul runs over the tiles (megablox's tiling). Its cost follows the real row count:
at most rows + groups * (tile - 1) padded rows.

FP8 experts (V3 sec. 3.3): `fp8_grouped_matmul` is fp8.fp8_matmul per expert, 128x128 blocks of each expert's
weight, rows in 1x128 tiles. Fprop and Dgrad are the grouped block-scaled GEMM (the Pallas kernel on GPUs; per
K block a ragged or tiled FP8 product, scaled, elsewhere). Wgrad pads each expert's rows to whole 128-row tiles,
so every 128x1 tile of x^T and dy belongs to one expert, and adds each tile's scaled product into its expert.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax import fp8
from deepseek_jax.backend import resolve
from kernels_pallas.fp8_gemm import check_operands, column_scales, fp8_gemm_grouped


def default_tile(rows: int, groups: int) -> int:
    """A power of two near rows / (2 * groups), in [8, 128]: padding stays under ~half the rows."""
    target = max(rows // (2 * groups), 8)
    return int(min(128, 1 << (target.bit_length() - 1)))


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str = "auto",
                   tile: int | None = None, preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """x [rows, k] sorted by group, w [groups, k, n], group_sizes [groups] -> [rows, n].

    Rows past sum(group_sizes) belong to no group and give zeros, as in ragged_dot."""
    if resolve("moe_impl", impl) == "ragged":
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=preferred_element_type)
    return _tiled_grouped_matmul(x, w, group_sizes, tile or default_tile(x.shape[0], w.shape[0]),
                                 preferred_element_type)


def tile_layout(group_sizes: jax.Array, rows: int, tile: int) -> tuple[jax.Array, int, jax.Array]:
    """Rows sorted by group, each group padded to whole tiles: (each row's slot [rows], the static tile count,
    each tile's group [tiles]). Rows past sum(group_sizes) get the slot tiles * tile (dropped)."""
    groups = group_sizes.shape[0]
    n_tiles = (rows + groups * (tile - 1)) // tile  # static bound on sum_g ceil(size_g / tile)
    padded = (group_sizes + tile - 1) // tile * tile
    pad_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes) - group_sizes
    row_group = jnp.repeat(jnp.arange(groups), group_sizes, total_repeat_length=rows)
    in_group = jnp.arange(rows) < jnp.sum(group_sizes)
    dest = jnp.where(in_group, (pad_end - padded)[row_group] + jnp.arange(rows) - start[row_group], n_tiles * tile)
    tile_group = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(n_tiles) * tile, side="right"), groups - 1)
    return dest, n_tiles, tile_group


def _to_tiles(x: jax.Array, dest: jax.Array, n_tiles: int, tile: int) -> jax.Array:
    return jnp.zeros((n_tiles * tile, x.shape[1]), x.dtype).at[dest].set(x, mode="drop")


def _from_tiles(y: jax.Array, dest: jax.Array) -> jax.Array:
    return y.reshape(-1, y.shape[-1]).at[dest].get(mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int,
                          preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    return _tiled_gmm_fwd(x, w, group_sizes, tile, preferred_element_type)[0]


def _tiled_gmm_fwd(x, w, group_sizes, tile, out_dtype):
    """Y_tile = X_tile W_g(tile); the tiles and the layout are the residuals."""
    dest, n_tiles, tile_group = tile_layout(group_sizes, x.shape[0], tile)
    xp = _to_tiles(x, dest, n_tiles, tile).reshape(n_tiles, tile, -1)
    yp = jnp.einsum("tmk,tkn->tmn", xp, w.astype(x.dtype)[tile_group], preferred_element_type=out_dtype)
    return _from_tiles(yp, dest), (xp, w, dest, tile_group)


def _tiled_gmm_bwd(tile, out_dtype, res, dy):
    """dX_tile = dY_tile W_g^T and dW_g = sum over g's tiles of X_tile^T dY_tile, each a plain (batched) matmul in
    row-major operand layouts, which XLA:CPU runs through its fast dot library rather than a transposing fallback."""
    xp, w, dest, tile_group = res
    n_tiles = xp.shape[0]
    dyp = _to_tiles(dy.astype(xp.dtype), dest, n_tiles, tile).reshape(n_tiles, tile, -1)
    dxp = jnp.einsum("tmn,tnk->tmk", dyp, jnp.swapaxes(w.astype(xp.dtype), 1, 2)[tile_group])
    dwp = jnp.einsum("tkm,tmn->tkn", jnp.swapaxes(xp, 1, 2), dyp, preferred_element_type=jnp.float32)
    dw = jnp.zeros(w.shape, jnp.float32).at[tile_group].add(dwp).astype(w.dtype)
    return _from_tiles(dxp, dest), dw, None


_tiled_grouped_matmul.defvjp(_tiled_gmm_fwd, _tiled_gmm_bwd)


# ---- FP8 experts -----------------------------------------------------------------------------------------------


def fp8_grouped_gemm(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array, group_sizes: jax.Array,
                     out_dtype: jnp.dtype = jnp.float32, impl: str = "auto") -> jax.Array:
    """The grouped block-scaled FP8 GEMM, operands as kernels_pallas.fp8_gemm.fp8_gemm_grouped -> [rows, N].

    impl: "pallas" (the kernel; interpreted on CPU), "ragged" / "tiled" (per 128-wide K block an FP8 grouped
    product into FP32, times a's row scales and each row's expert's b scales), or "auto": the kernel on CUDA
    GPUs with FP8 tensor cores (backend "fp8_gemm"), else ragged on TPU and tiled on CPU."""
    if impl == "pallas" or (impl == "auto" and resolve("fp8_gemm") == "pallas"):
        return fp8_gemm_grouped(a_q, a_s, b_q, b_s, group_sizes, out_dtype)
    return _fp8_grouped_xla(a_q, a_s, b_q, b_s, group_sizes, out_dtype=out_dtype, impl=resolve("moe_impl", impl))


def _fp8_grouped_xla(a_q, a_s, b_q, b_s, group_sizes, *, out_dtype, impl: str) -> jax.Array:
    groups = group_sizes.shape[0]
    m, _, n = check_operands(a_q, a_s, b_q, b_s, groups=groups)
    b_cols = column_scales(b_s, n)  # [G, K/128, N]
    row_group = jnp.repeat(jnp.arange(groups), group_sizes, total_repeat_length=m)
    out = jnp.zeros((m, n), jnp.float32)
    for kb in range(a_s.shape[1]):
        cols = slice(kb * fp8.BLOCK, (kb + 1) * fp8.BLOCK)
        part = grouped_matmul(a_q[:, cols], b_q[:, cols], group_sizes, impl, preferred_element_type=jnp.float32)
        out = out + part * a_s[:, kb, None] * b_cols[row_group, kb]
    return out.astype(out_dtype)


def _grouped_fprop(xq, xs, wq, ws, group_sizes, out_dtype, impl):
    return fp8_grouped_gemm(xq, xs, wq, ws, group_sizes, out_dtype, impl)


def grouped_wgrad(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, scale_fmt: str = "fp32") -> jax.Array:
    """dW[g] = x_g^T dy_g [groups, K, N], in FP8: each expert's rows padded to 128-row tiles, x^T and dy quantized
    in 128x1 tiles along the rows, each tile's scaled FP32 product added into its expert."""
    dest, n_tiles, tile_group = tile_layout(group_sizes, x.shape[0], fp8.BLOCK)
    a_q, a_s = fp8.quantize_activations(_to_tiles(x, dest, n_tiles, fp8.BLOCK).T, scale_fmt=scale_fmt)
    b_q, b_s = fp8.quantize_activations(_to_tiles(dy, dest, n_tiles, fp8.BLOCK).T, scale_fmt=scale_fmt)
    return fp8.gemm_xla(a_q, a_s, b_q.T, b_s.T, k_groups=tile_group, groups=group_sizes.shape[0])


@functools.cache
def grouped_gemms(impl: str = "auto") -> fp8.Gemms:
    return fp8.Gemms(functools.partial(_grouped_fprop, impl=impl), grouped_wgrad)


def fp8_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, w_scale: jax.Array | None = None, *,
                       scale_fmt: str = "fp32", impl: str = "auto") -> jax.Array:
    """x [rows, K] sorted by group times w [groups, K, N] -> [rows, N] in x's dtype, in FP8 (V3 sec. 3.3).

    Differentiable (Fprop, Dgrad and Wgrad in FP8). w_scale [groups, ceil(K/128), ceil(N/128)]: w holds E4M3
    codes already (an FP8 checkpoint), used as they are. Rows past sum(group_sizes) give zeros."""
    if w.ndim != 3 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_grouped_matmul: x {x.shape} [rows, K] and w {w.shape} [groups, K, N] do not match")
    return fp8.fp8_linear(x, w, w_scale, group_sizes.astype(jnp.int32), grouped_gemms(impl), scale_fmt)
