"""Block-scaled FP8 GEMM (the DeepGEMM analogue) in Pallas, dense and grouped by expert.

DeepSeek-V3 (sec. 3.3.2) quantizes activations in 1x128 tiles and weights in 128x128 blocks, so a 128-wide
block of K shares one scale per row of a and one per column block of b. The GEMM promotes every N_C = 128:

    out[m, n] = sum_kb ( sum_{k in block kb} a_q[m, k] b_q[k, n] ) * a_s[m, kb] * b_s[kb, n // 128]

each inner sum one FP8 tensor-core dot into an FP32 partial, scaled and added into an FP32 accumulator.
b_s may also hold one scale per column, [K/128, N] (128x1 tiles: V3's Wgrad operand dy).

Grouped (MoE experts, megablox's layout): rows of a sorted by group, group g's rows times b[g]. The grid walks
work items (row tile, group) built from the group offsets; a tile that straddles a boundary is visited once per
group, and each visit stores only its group's rows. The dense GEMM is the grouped one with a single group.

Triton body (Hopper: FP8 wgmma; a program per work item and column tile loops over the K blocks). Elsewhere
deepseek_jax.fp8 runs the same sums as XLA dot_generals. Partial tiles are zero-padded (a copy unless M, N and K
are multiples of the tiles), never cropped before the sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import by_platform, dot

BLOCK_K = 128  # N_C: one scale per 128 of K, and one FP32 promotion


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_fp8(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize == 1


def check_operands(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array,
                   groups: int | None = None) -> tuple[int, int, int]:
    """(M, K, N) of a_q [M, K] fp8 with a_s [M, ceil(K/128)], and b_q [K, N] fp8 with b_s [ceil(K/128),
    ceil(N/128)] (128x128 blocks) or [ceil(K/128), N] (per column); with `groups`, b_q [G, K, N] and b_s
    [G, ...]. Raises ValueError naming the operand, the shape seen and the shape wanted."""
    lead = () if groups is None else (groups,)
    if a_q.ndim != 2:
        raise ValueError(f"fp8 gemm: a_q must be 2-D [M, K], got shape {a_q.shape}")
    if b_q.ndim != 2 + len(lead) or b_q.shape[:len(lead)] != lead:
        want = "[K, N]" if groups is None else f"[G={groups}, K, N]"
        raise ValueError(f"fp8 gemm: b_q must be {want}, got shape {b_q.shape}")
    (m, k), (k2, n) = a_q.shape, b_q.shape[-2:]
    if k != k2:
        raise ValueError(f"fp8 gemm: K mismatch, a_q {a_q.shape} contracts K={k} but b_q {b_q.shape} has K={k2}")
    for name, x in (("a_q", a_q), ("b_q", b_q)):
        if not _is_fp8(x):
            raise ValueError(f"fp8 gemm: {name} must hold FP8 codes (e.g. float8_e4m3fn), got {x.dtype}")
    kb = _cdiv(k, BLOCK_K)
    if a_s.shape != (m, kb):
        raise ValueError(f"fp8 gemm: a_s has shape {a_s.shape}; a_q {a_q.shape} in 1x{BLOCK_K} tiles needs "
                         f"{(m, kb)}")
    blocks, cols = (*lead, kb, _cdiv(n, BLOCK_K)), (*lead, kb, n)
    if b_s.shape not in (blocks, cols):
        raise ValueError(f"fp8 gemm: b_s has shape {b_s.shape}; b_q {b_q.shape} needs {blocks} "
                         f"({BLOCK_K}x{BLOCK_K} blocks) or {cols} (one scale per column per K block)")
    return m, k, n


def column_scales(b_s: jax.Array, n: int) -> jax.Array:
    """b's scales as one per column per K block: [..., K/128, N] (128x128 block scales repeated)."""
    if b_s.shape[-1] == n:
        return b_s.astype(jnp.float32)
    return jnp.repeat(b_s.astype(jnp.float32), BLOCK_K, axis=-1)[..., :n]


def group_metadata(group_sizes: jax.Array, rows: int, block_m: int) -> tuple[jax.Array, ...]:
    """Work items over rows sorted by group: (group, row tile, first row, end row), each [rows/block_m + G - 1].

    Group g covers rows [offset_g, offset_g + size_g) and visits every tile of block_m rows it touches, so a tile
    that straddles groups appears once per group. Items past the last are idle (empty row range) and repeat the
    last tile. rows must be a multiple of block_m; rows past sum(group_sizes) belong to no group."""
    g = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), rows)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    first = starts // block_m
    count = jnp.where(ends > starts, _cdiv_arr(ends, block_m) - first, 0)
    done = jnp.cumsum(count)
    items = jnp.arange(rows // block_m + g - 1, dtype=jnp.int32)
    gid = jnp.minimum(jnp.searchsorted(done, items, side="right"), g - 1).astype(jnp.int32)
    live = items < done[-1]
    tile = first[gid] + items - (done - count)[gid]
    last = jnp.max(jnp.where(live, tile, 0))
    return gid, jnp.where(live, tile, last), jnp.where(live, starts[gid], 0), jnp.where(live, ends[gid], 0)


def _cdiv_arr(x: jax.Array, d: int) -> jax.Array:
    return (x + d - 1) // d


def _gpu_kernel(gid_ref, tile_ref, lo_ref, hi_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, bm: int, bn: int,
                kb: int):
    """Work item w, column tile j: the FP32 sum over K blocks for rows [lo, hi) of its row tile, group g."""
    w = pl.program_id(0)
    g, lo, hi = gid_ref[w], lo_ref[w], hi_ref[w]
    r0 = pl.multiple_of(tile_ref[w] * bm, bm)
    rows = pl.ds(r0, bm)

    @pl.when(lo < hi)
    def _():
        def k_block(k, acc):
            cols = pl.ds(pl.multiple_of(k * BLOCK_K, BLOCK_K), BLOCK_K)
            part = dot(a_ref[rows, cols], b_ref[g, cols, :], 1, 0)  # one FP8 dot, FP32 out
            return acc + part * as_ref[k, rows][:, None] * bs_ref[g, k, :][None, :]

        acc = lax.fori_loop(0, kb, k_block, jnp.zeros((bm, bn), jnp.float32))
        row = r0 + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
        plgpu.store(o_ref.at[rows, :], acc.astype(o_ref.dtype), mask=(row >= lo) & (row < hi))


def _pad(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = _cdiv(x.shape[axis], multiple) * multiple - x.shape[axis]
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def _default_block_m(m: int) -> int:
    return int(min(128, max(16, pl.next_power_of_2(m))))


def fp8_gemm(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array, out_dtype: jnp.dtype = jnp.bfloat16,
             interpret: bool | None = None, *, block_m: int | None = None, block_n: int = 128) -> jax.Array:
    """a_q [M, K] fp8 with a_s [M, ceil(K/128)] times b_q [K, N] fp8 with b_s [ceil(K/128), ceil(N/128)] (or
    [ceil(K/128), N]) -> [M, N] in out_dtype, summed in FP32 with the scales applied per K block.

    interpret=None interprets on CPU. block_m: rows per tile (default: up to 128), block_n: columns per tile."""
    m, _, _ = check_operands(a_q, a_s, b_q, b_s)
    return _grouped(a_q, a_s, b_q[None], b_s[None], jnp.full((1,), m, jnp.int32), out_dtype, interpret,
                    block_m or _default_block_m(m), block_n)


def fp8_gemm_grouped(a_q: jax.Array, a_s: jax.Array, b_q: jax.Array, b_s: jax.Array, group_sizes: jax.Array,
                     out_dtype: jnp.dtype = jnp.bfloat16, interpret: bool | None = None, *, block_m: int = 64,
                     block_n: int = 128) -> jax.Array:
    """a_q [M, K] fp8 with a_s [M, ceil(K/128)], rows sorted by group; b_q [G, K, N] fp8 with b_s
    [G, ceil(K/128), ceil(N/128)] (or [G, ceil(K/128), N]); group_sizes [G] int -> [M, N] in out_dtype,
    row r of group g being a_r . b[g]. Rows past sum(group_sizes) give zeros (as jax.lax.ragged_dot)."""
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"fp8 gemm: group_sizes must be [G] integers, got {group_sizes.shape} {group_sizes.dtype}")
    check_operands(a_q, a_s, b_q, b_s, groups=group_sizes.shape[0])
    return _grouped(a_q, a_s, b_q, b_s, group_sizes, out_dtype, interpret, block_m, block_n)


def _grouped(a_q, a_s, b_q, b_s, group_sizes, out_dtype, interpret, bm: int, bn: int) -> jax.Array:
    """The kernel, interpreted or not by the platform lowered for (kernels_pallas.by_platform; one Triton body)."""
    def body(*args, family: str, interpret: bool):
        return _grouped_kernel(*args, out_dtype, interpret, bm, bn)

    return by_platform(body, interpret, a_q, a_s, b_q, b_s, group_sizes)


def _grouped_kernel(a_q, a_s, b_q, b_s, group_sizes, out_dtype, interpret: bool, bm: int, bn: int) -> jax.Array:
    (m, k), (g, _, n) = a_q.shape, b_q.shape
    kb = _cdiv(k, BLOCK_K)
    b_cols = column_scales(b_s, n)
    a_q, a_s = _pad(_pad(a_q, 1, BLOCK_K), 0, bm), _pad(a_s.astype(jnp.float32), 0, bm).T  # a_s: [Kb, Mp]
    b_q, b_cols = _pad(_pad(b_q, 1, BLOCK_K), 2, bn), _pad(b_cols, 2, bn)
    mp, kp, np_ = a_q.shape[0], a_q.shape[1], b_q.shape[2]
    meta = group_metadata(group_sizes, mp, bm)
    items = meta[0].shape[0]
    whole = lambda shape: pl.BlockSpec(shape, lambda w, j: (0,) * len(shape))  # indexed inside the kernel
    grid_spec = pl.GridSpec(
        grid=(items, np_ // bn),
        in_specs=[*(whole((items,)) for _ in meta), whole((mp, kp)), whole((kb, mp)),
                  pl.BlockSpec((g, kp, bn), lambda w, j: (0, 0, j)), pl.BlockSpec((g, kb, bn), lambda w, j: (0, 0, j))],
        out_specs=pl.BlockSpec((mp, bn), lambda w, j: (0, j)))
    cost = pl.CostEstimate(flops=2 * m * n * kp, transcendentals=0,
                           bytes_accessed=a_q.size + b_q.size + m * n * jnp.dtype(out_dtype).itemsize)
    out = pl.pallas_call(
        functools.partial(_gpu_kernel, bm=bm, bn=bn, kb=kb),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype), grid_spec=grid_spec,
        compiler_params=plgpu.CompilerParams(num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3),
        interpret=interpret, cost_estimate=cost, name="fp8_gemm")(*meta, a_q, a_s, b_q, b_cols)
    covered = jnp.arange(m)[:, None] < jnp.minimum(jnp.sum(group_sizes), m)  # rows no group wrote stay zero
    return jnp.where(covered, out[:m, :n], 0).astype(out_dtype)
