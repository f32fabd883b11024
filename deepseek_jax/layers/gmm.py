"""Grouped matmul for dropless MoE: rows sorted by expert, each group times its own weight.

`ragged` calls jax.lax.ragged_dot, native on GPU and TPU. XLA:CPU lowers ragged_dot to a
dense product per group (cost grows with the number of groups), so `tiled` is the CPU path:
each group is padded to whole row tiles, every tile belongs to one group, and one batched
matmul runs over the tiles (megablox's tiling). Its cost follows the real row count:
at most rows + groups * (tile - 1) padded rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve_impl(impl: str = "auto") -> str:
    if impl == "auto":
        return "ragged" if jax.default_backend() in ("gpu", "tpu") else "tiled"
    if impl not in ("ragged", "tiled"):
        raise ValueError(f"grouped matmul impl {impl!r}: choose auto, ragged or tiled")
    return impl


def default_tile(rows: int, groups: int) -> int:
    """A power of two near rows / (2 * groups), in [8, 128]: padding stays under ~half the rows."""
    target = max(rows // (2 * groups), 8)
    return int(min(128, 1 << (target.bit_length() - 1)))


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str = "auto",
                   tile: int | None = None) -> jax.Array:
    """x [rows, k] sorted by group, w [groups, k, n], group_sizes [groups] -> [rows, n].

    Rows past sum(group_sizes) belong to no group and give zeros, as in ragged_dot."""
    if resolve_impl(impl) == "ragged":
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
    return _tiled_grouped_matmul(x, w, group_sizes, tile or default_tile(x.shape[0], w.shape[0]))


def _tiled_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, tile: int) -> jax.Array:
    rows, groups = x.shape[0], w.shape[0]
    n_tiles = (rows + groups * (tile - 1)) // tile  # static bound on sum_g ceil(size_g / tile)
    padded = (group_sizes + tile - 1) // tile * tile
    pad_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes) - group_sizes
    row_group = jnp.repeat(jnp.arange(groups), group_sizes, total_repeat_length=rows)
    in_group = jnp.arange(rows) < jnp.sum(group_sizes)
    dest = jnp.where(in_group, (pad_end - padded)[row_group] + jnp.arange(rows) - start[row_group], n_tiles * tile)
    xp = jnp.zeros((n_tiles * tile, x.shape[1]), x.dtype).at[dest].set(x, mode="drop").reshape(n_tiles, tile, -1)
    tile_group = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(n_tiles) * tile, side="right"), groups - 1)
    yp = jnp.einsum("tmk,tkn->tmn", xp, w.astype(x.dtype)[tile_group])
    return yp.reshape(n_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0)
