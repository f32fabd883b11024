"""Multi-head Latent Attention decoding over a shared latent KV cache (the FlashMLA analogue), in Pallas.

DeepSeek-V2's absorption folds the key up-projection into the query, q^T (W_UK c) = (W_UK^T q)^T c, so every
head of a row attends over the same cache of latents c (kv_lora_rank wide) plus one shared rope key:

    score[h, s] = (q_latent[h] . kv_latent[s] + q_rope[h] . k_rope[s]) * softmax_scale,   s < lengths[b]
    out[h] = sum_s softmax(score[h])_s kv_latent[s]                   (the values are the latents themselves)

All heads (times the T speculative queries) form the M dimension of one [M, C] x [C, block] matmul per KV block.
The sequence is tiled flash-decoding style: a running max m, sum l and accumulator acc (f32) per row,
acc <- exp(m - m') acc + exp(s - m') V, and split across `num_splits` grid programs; each split writes
acc / l and its log-sum-exp lse = m + log l, merged as out = sum_i softmax_i(lse_i) o_i. KV blocks past a
row's length cost nothing. Two kernel bodies share that update: a Triton one (GPU: a loop over KV blocks per
program, the length as a kernel operand) and a Mosaic one (TPU: KV blocks as an "arbitrary" grid axis with
VMEM scratch, the lengths prefetched to SMEM).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import by_platform, dot, online_finish, online_init, online_softmax

_GPU_BLOCK_H = 32  # rows (heads x queries) per Triton program: a [32, C] f32 accumulator stays in registers


def _online_step(q, qr, kv, kr, carry, *, length, row0, pos0, scale: float, heads: int, queries: int):
    """Fold one KV block (kv [bk, C], kr [bk, R] at positions pos0...) into the running (m, l, acc) of rows
    row0... of q [M, C], qr [M, R]; row r is query r // heads, which sees `queries - 1 - r // heads` keys fewer."""
    shape = (q.shape[0], kv.shape[0])
    row = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    pos = pos0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    limit = length - (queries - 1)
    for t in range(1, queries):
        limit = limit + (row >= t * heads).astype(jnp.int32)
    return online_softmax(carry, (dot(q, kv) + dot(qr, kr)) * scale, pos < limit, kv)


def _gpu_kernel(len_ref, *refs, bk: int, per_split: int, paged: bool, **kw):
    """Program (head block, split, row): a loop over the split's KV blocks that hold any key below the length
    (paged: block i is page table[i] of the whole pool)."""
    table_ref, (q_ref, qr_ref, kv_ref, kr_ref, o_ref, lse_ref) = (refs[0], refs[1:]) if paged else (None, refs)
    length = len_ref[()]
    q, qr = q_ref[...], qr_ref[...]
    bh, c = q.shape
    row0, lo = pl.program_id(0) * bh, pl.program_id(1) * per_split  # (program_id is read outside the loop)
    hi = jnp.minimum(lo + per_split, pl.cdiv(length, bk))

    def body(i, carry):
        start = pl.multiple_of(i * bk, bk)
        src = pl.multiple_of(table_ref[i] * bk, bk) if paged else start
        live = (start + jnp.arange(bk) < length)[:, None]  # the loads zero keys past the length
        kv = plgpu.load(kv_ref.at[pl.ds(src, bk), :], mask=live, other=0)
        kr = plgpu.load(kr_ref.at[pl.ds(src, bk), :], mask=live, other=0)
        return _online_step(q, qr, kv, kr, carry, length=length, row0=row0, pos0=start, **kw)

    o, lse = online_finish(*lax.fori_loop(lo, hi, body, online_init(bh, c)))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _tpu_kernel(len_ref, *refs, bk: int, per_split: int, paged: bool, **kw):
    """Grid step (row, split, j): KV block split * per_split + j (paged: the page the prefetched table names),
    DMA'd to VMEM; skipped past the length."""
    q_ref, qr_ref, kv_ref, kr_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[1:] if paged else refs
    length = len_ref[pl.program_id(0)]
    j = pl.program_id(2)
    start = (pl.program_id(1) * per_split + j) * bk

    @pl.when(j == 0)
    def _init():
        m_sc[...], l_sc[...], acc_sc[...] = online_init(*acc_sc.shape)

    @pl.when(start < length)
    def _step():
        live = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < length
        kv, kr = jnp.where(live, kv_ref[...], 0), jnp.where(live, kr_ref[...], 0)
        carry = (m_sc[...], l_sc[...], acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = _online_step(q_ref[...], qr_ref[...], kv, kr, carry, length=length,
                                                         row0=0, pos0=start, **kw)

    @pl.when(j == per_split - 1)
    def _write():
        o, lse = online_finish(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _pad_rows(x: jax.Array, n: int) -> jax.Array:
    """Zero-pad axis 1 of x [B, N, D] to n."""
    return x if x.shape[1] == n else jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0)))


def _default_splits(programs: int, blocks: int, family: str) -> int:
    """Enough splits for ~2 programs per SM (TensorCore on TPU), at least 4 KV blocks each."""
    units = 2 if family == "tpu" else getattr(jax.devices()[0], "core_count", None) or 132
    return max(1, min(pl.cdiv(2 * units, programs), blocks // 4))


def mla_decode(q_latent: jax.Array, q_rope: jax.Array, kv_latent: jax.Array, k_rope: jax.Array,
               lengths: jax.Array, softmax_scale: float, interpret: bool | None = None, *,
               block_kv: int | None = None, num_splits: int | None = None,
               page_table: jax.Array | None = None) -> jax.Array:
    """Absorbed-MLA decode attention of q_latent [B, H, C] or [B, T, H, C] and q_rope [.., R] over kv_latent
    [B, L, C] and k_rope [B, L, R], lengths [B] valid keys per row (the T queries are a row's last T tokens:
    query t sees lengths - (T - 1 - t) keys); returns [.., C] in q_latent's dtype, zeros where nothing is visible.

    Paged (page_table [B, max_pages] int32): kv_latent [num_pages, page, C] and k_rope [num_pages, page, R] are one
    pool of pages, and row b's key s is at page page_table[b, s // page], offset s % page; a KV block is a page,
    read straight from the pool (scalar-prefetched page ids on TPU), never gathered into a contiguous copy.

    interpret=None interprets on CPU. block_kv: keys per block (default 64 on GPU, up to 512 on TPU; Triton wants
    powers of two >= 16, as C and R; paged: the page size). num_splits: programs per row along the sequence
    (default: about two programs per SM, at least 4 KV blocks each)."""
    def body(q_latent, q_rope, kv_latent, k_rope, lengths, *table, interpret: bool, family: str) -> jax.Array:
        return _mla_decode(q_latent, q_rope, kv_latent, k_rope, lengths, softmax_scale, interpret, block_kv=block_kv,
                           num_splits=num_splits, family=family, table=table[0] if table else None)

    # "no page" entries of a table lie past their row's length: clipped, they are never read
    table = () if page_table is None else (jnp.clip(page_table.astype(jnp.int32), 0, kv_latent.shape[0] - 1),)
    return by_platform(body, interpret, q_latent, q_rope, kv_latent, k_rope, lengths, *table)


def _mla_decode(q_latent, q_rope, kv_latent, k_rope, lengths, softmax_scale: float, interpret: bool, *,
                family: str, block_kv: int | None = None, num_splits: int | None = None, table: jax.Array | None = None
                ) -> jax.Array:
    paged = table is not None
    shape = q_latent.shape
    if q_latent.ndim not in (3, 4) or q_rope.shape[:-1] != shape[:-1]:
        raise ValueError(f"q_latent {shape} / q_rope {q_rope.shape}: want [B, H, C] / [B, H, R] or [B, T, H, ..]")
    batch, queries, heads, c = shape if q_latent.ndim == 4 else (shape[0], 1, *shape[1:])
    r = q_rope.shape[-1]
    rows = queries * heads
    if paged:
        num_pages, bk = kv_latent.shape[:2]
        length_max = padded = bk * table.shape[1]
        if kv_latent.shape != (num_pages, bk, c) or k_rope.shape != (num_pages, bk, r) or table.shape[0] != batch:
            raise ValueError(f"paged kv_latent {kv_latent.shape} / k_rope {k_rope.shape} / page_table {table.shape} "
                             f"do not match q {shape}: want [pages, page, C], [pages, page, R], [B, max_pages]")
        if family == "gpu":  # the Triton body reads the pool as one array of rows
            kv_latent, k_rope = kv_latent.reshape(-1, c), k_rope.reshape(-1, r)
    else:
        length_max = kv_latent.shape[1]
        if kv_latent.shape != (batch, length_max, c) or k_rope.shape != (batch, length_max, r):
            raise ValueError(f"kv_latent {kv_latent.shape} / k_rope {k_rope.shape} do not match q {shape}")
        bk = block_kv or (64 if family == "gpu" else min(512, pl.cdiv(length_max, 128) * 128))
        padded = pl.cdiv(length_max, bk) * bk  # a ragged last block is zero-padded (a copy: choose L % bk == 0)
        kv_latent, k_rope = _pad_rows(kv_latent, padded), _pad_rows(k_rope, padded)
    blocks = padded // bk
    bh = min(_GPU_BLOCK_H, max(16, pl.next_power_of_2(rows))) if family == "gpu" else rows
    m_pad = pl.cdiv(rows, bh) * bh
    q, qr = (_pad_rows(x.reshape(batch, rows, -1), m_pad) for x in (q_latent, q_rope))
    splits = num_splits or _default_splits(batch * (m_pad // bh), blocks, family)
    per_split = pl.cdiv(blocks, min(splits, blocks))
    splits = pl.cdiv(blocks, per_split)  # no split left without a block
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, length_max)
    o_dtype = q_latent.dtype if splits == 1 else jnp.float32
    out_shape = (jax.ShapeDtypeStruct((batch, splits, m_pad, c), o_dtype),
                 jax.ShapeDtypeStruct((batch, splits, m_pad, 1), jnp.float32))
    kw = dict(bk=bk, per_split=per_split, scale=float(softmax_scale), heads=heads, queries=queries, paged=paged)
    if family == "gpu":
        if paged:  # the whole pool, and the row's page table
            kv_specs = [pl.BlockSpec((None, table.shape[1]), lambda h, s, b: (b, 0)),
                        pl.BlockSpec(kv_latent.shape, lambda h, s, b: (0, 0)),
                        pl.BlockSpec(k_rope.shape, lambda h, s, b: (0, 0))]
        else:
            kv_specs = [None, pl.BlockSpec((None, padded, c), lambda h, s, b: (b, 0, 0)),
                        pl.BlockSpec((None, padded, r), lambda h, s, b: (b, 0, 0))]
        grid_spec = pl.GridSpec(
            grid=(m_pad // bh, splits, batch),  # head blocks vary fastest: they share one split's KV in L2
            in_specs=[pl.BlockSpec((None,), lambda h, s, b: (b,))] + kv_specs[:1] * paged + [
                      pl.BlockSpec((None, bh, c), lambda h, s, b: (b, h, 0)),
                      pl.BlockSpec((None, bh, r), lambda h, s, b: (b, h, 0))] + kv_specs[1:],
            out_specs=[pl.BlockSpec((None, None, bh, c), lambda h, s, b: (b, s, h, 0)),
                       pl.BlockSpec((None, None, bh, 1), lambda h, s, b: (b, s, h, 0))])
        kernel, params = _gpu_kernel, plgpu.CompilerParams(num_warps=8, num_stages=2)
    else:
        def kv_map(b, s, j, len_ref, *table_ref):  # blocks past the length repeat the last live one: no new DMA
            block = jnp.minimum(s * per_split + j, jnp.maximum(pl.cdiv(len_ref[b], bk) - 1, 0))
            return (table_ref[0][b, block], 0, 0) if paged else (b, block, 0)

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1 + paged, grid=(batch, splits, per_split),
            in_specs=[pl.BlockSpec((None, m_pad, c), lambda b, s, j, *_: (b, 0, 0)),
                      pl.BlockSpec((None, m_pad, r), lambda b, s, j, *_: (b, 0, 0)),
                      pl.BlockSpec((None, bk, c), kv_map), pl.BlockSpec((None, bk, r), kv_map)],
            out_specs=[pl.BlockSpec((None, None, m_pad, c), lambda b, s, j, *_: (b, s, 0, 0)),
                       pl.BlockSpec((None, None, m_pad, 1), lambda b, s, j, *_: (b, s, 0, 0))],
            scratch_shapes=[pltpu.VMEM((m_pad, 1), jnp.float32), pltpu.VMEM((m_pad, 1), jnp.float32),
                            pltpu.VMEM((m_pad, c), jnp.float32)])
        kernel = _tpu_kernel
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    cost = pl.CostEstimate(  # for XLA's scheduler, which cannot see into the kernel; full lengths assumed
        flops=2 * batch * rows * length_max * (2 * c + r), transcendentals=batch * rows * length_max,
        bytes_accessed=sum(x.size * x.dtype.itemsize for x in (q, qr, *out_shape))
        + batch * length_max * (c + r) * kv_latent.dtype.itemsize)
    o, lse = pl.pallas_call(functools.partial(kernel, **kw), out_shape=out_shape, grid_spec=grid_spec,
                            compiler_params=params, interpret=interpret, cost_estimate=cost, name="mla_decode")(
        lengths, *((table,) if paged else ()), q, qr, kv_latent, k_rope)
    if splits > 1:  # log-sum-exp merge of the splits; splits that saw nothing weigh exp(NEG - lse) = 0
        o = jnp.sum(jax.nn.softmax(lse, axis=1) * o, axis=1, keepdims=True).astype(q_latent.dtype)
    return o[:, 0, :rows].reshape(shape)
