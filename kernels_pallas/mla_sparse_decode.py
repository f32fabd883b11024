"""DeepSeek Sparse Attention decoding over the latent cache (the FlashMLA sparse-decode analogue), in Pallas.

With DSA (V3.2) every query attends only to the index_topk cache rows its lightning indexer selected; as in
absorbed MLA decoding all heads share them (the MQA form), so for one query

    score[h, j] = (q_latent[h] . kv_latent[idx_j] + q_rope[h] . k_rope[idx_j]) * softmax_scale,   idx_j >= 0
    out[h] = sum_j softmax(score[h])_j kv_latent[idx_j]                 (the values are the latents themselves)

The selected rows are gathered inside the kernel, never copied out by XLA. The indices are rows of each batch
row's cache [B, L, .], or of one flat pool [N, .] shared by all rows (a paged cache: the physical rows). Both
bodies walk the selection in blocks of `block_k` indices with flash attention's online softmax, and stop after a
query's valid indices (they are moved first): Triton (GPU) loads each block's rows with one gathered load; Mosaic
(TPU) reads each block's indices from SMEM and DMAs its rows one by one from HBM into VMEM, then multiplies.

On TPU a single token's row must be contiguous in HBM to be DMA'd alone, and XLA's tiled layout of a [N, C]
cache is not (16 bf16 rows share a tile, a DMA offset along a tiled axis must be tile-aligned): the rows are given
to the Mosaic body as [N, 1, C], a relayout XLA performs per call unless the pool is already stored that way
(which pads bf16 rows to the packed sublane pair). A TPU-native row layout is the open part of this kernel.
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

_GPU_BLOCK_H = 32  # heads per Triton program: a [32, C] f32 accumulator stays in registers


def _gpu_kernel(count_ref, idx_ref, q_ref, qr_ref, kv_ref, kr_ref, o_ref, *, bk: int, scale: float):
    """Program (head block, query): a loop over the query's blocks of indices that hold a valid one."""
    q, qr = q_ref[...], qr_ref[...]

    def body(j, carry):
        idx = idx_ref[pl.ds(pl.multiple_of(j * bk, bk), bk)]
        rows = jnp.maximum(idx, 0)
        kv, kr = kv_ref[rows, :], kr_ref[rows, :]  # one gathered load per block
        return online_softmax(carry, (dot(q, kv) + dot(qr, kr)) * scale, (idx >= 0)[None, :], kv)

    o, _ = online_finish(*lax.fori_loop(0, pl.cdiv(count_ref[()], bk), body, online_init(*q.shape)))
    o_ref[...] = o.astype(o_ref.dtype)


def _tpu_kernel(count_ref, addr_ref, idx_ref, q_ref, qr_ref, kv_hbm, kr_hbm, o_ref, kv_buf, kr_buf, sem,
                m_sc, l_sc, acc_sc, *, bk: int, scale: float):
    """Grid step (query, block j): the block's bk indices in SMEM (addresses) and VMEM (the mask); DMA its rows from
    HBM into VMEM, then fold them in. Blocks past the query's valid indices are skipped."""
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...], l_sc[...], acc_sc[...] = online_init(*acc_sc.shape)

    @pl.when(j * bk < count_ref[i])
    def _step():
        def copies(r):
            row = jnp.maximum(addr_ref[0, r], 0)
            return (pltpu.make_async_copy(kv_hbm.at[pl.ds(row, 1)], kv_buf.at[pl.ds(r, 1)], sem),
                    pltpu.make_async_copy(kr_hbm.at[pl.ds(row, 1)], kr_buf.at[pl.ds(r, 1)], sem))

        def start(r, _):
            for c in copies(r):
                c.start()
            return 0

        def wait(r, _):
            for c in copies(r):
                c.wait()
            return 0

        lax.fori_loop(0, bk, start, 0)
        lax.fori_loop(0, bk, wait, 0)
        kv, kr = kv_buf[:, 0, :], kr_buf[:, 0, :]  # rows sit one per tile row: [bk, 1, C] -> [bk, C]
        s = (dot(q_ref[...], kv) + dot(qr_ref[...], kr)) * scale
        m_sc[...], l_sc[...], acc_sc[...] = online_softmax((m_sc[...], l_sc[...], acc_sc[...]), s,
                                                           idx_ref[...] >= 0, kv)

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        o_ref[...] = online_finish(m_sc[...], l_sc[...], acc_sc[...])[0].astype(o_ref.dtype)


def mla_sparse_decode(q_latent: jax.Array, q_rope: jax.Array, kv_latent: jax.Array, k_rope: jax.Array,
                      indices: jax.Array, softmax_scale: float, interpret: bool | None = None, *,
                      block_k: int | None = None) -> jax.Array:
    """Absorbed-MLA attention of each query over its own selected cache rows: q_latent [B, H, C] or [B, T, H, C]
    and q_rope [.., R]; indices [B, K] or [B, T, K] int32, -1 for none (a query with fewer keys than K); kv_latent
    [B, L, C] and k_rope [B, L, R] with indices into each row's L, or [N, C] and [N, R] with indices into that
    pool. Returns [.., C] in q_latent's dtype, zeros for a query with no valid index.

    interpret=None interprets on CPU. block_k: indices per block (default 32 on GPU, 128 on TPU; Triton wants a
    power of two >= 16, as C and R)."""
    body = functools.partial(_sparse_decode, softmax_scale=softmax_scale, block_k=block_k)
    return by_platform(body, interpret, q_latent, q_rope, kv_latent, k_rope, indices)


def _sparse_decode(q_latent, q_rope, kv_latent, k_rope, indices, softmax_scale: float, interpret: bool, *,
                   block_k: int | None, family: str) -> jax.Array:
    shape = q_latent.shape
    if q_latent.ndim not in (3, 4) or q_rope.shape[:-1] != shape[:-1] or indices.shape[:-1] != shape[:-2]:
        raise ValueError(f"q_latent {shape} / q_rope {q_rope.shape} / indices {indices.shape}: want [B, H, C] / "
                         "[B, H, R] / [B, K], or [B, T, H, ..] with indices [B, T, K]")
    batch, heads, c, r = shape[0], shape[-2], shape[-1], q_rope.shape[-1]
    if kv_latent.ndim == 3:  # per-row caches -> one pool of B * L rows
        length = kv_latent.shape[1]
        if kv_latent.shape != (batch, length, c) or k_rope.shape != (batch, length, r):
            raise ValueError(f"kv_latent {kv_latent.shape} / k_rope {k_rope.shape} do not match q {shape}")
        offset = (jnp.arange(batch, dtype=jnp.int32) * length).reshape(batch, *(1,) * (indices.ndim - 1))
        indices = jnp.where(indices >= 0, indices + offset, -1)
        kv_latent, k_rope = kv_latent.reshape(-1, c), k_rope.reshape(-1, r)
    elif kv_latent.shape[1:] != (c,) or k_rope.shape != (kv_latent.shape[0], r):
        raise ValueError(f"kv_latent {kv_latent.shape} / k_rope {k_rope.shape}: want pools [N, {c}] / [N, {r}]")
    queries, k = indices.size // indices.shape[-1], indices.shape[-1]
    idx = indices.reshape(queries, k).astype(jnp.int32)
    idx = jnp.take_along_axis(idx, jnp.argsort(idx < 0, axis=1, stable=True), axis=1)  # valid indices first
    counts = jnp.sum(idx >= 0, axis=1).astype(jnp.int32)
    bk = block_k or (32 if family == "gpu" else 128)
    width = pl.cdiv(k, bk) * bk
    idx = jnp.pad(idx, ((0, 0), (0, width - k)), constant_values=-1)
    q, qr = q_latent.reshape(queries, heads, c), q_rope.reshape(queries, heads, r)
    out_shape = jax.ShapeDtypeStruct((queries, heads, c), q_latent.dtype)
    kw = dict(bk=bk, scale=float(softmax_scale))
    cost = pl.CostEstimate(flops=2 * queries * heads * k * (2 * c + r), transcendentals=queries * heads * k,
                           bytes_accessed=queries * k * (c + r) * kv_latent.dtype.itemsize
                           + 2 * q.size * q.dtype.itemsize)
    if family == "gpu":
        bh = min(_GPU_BLOCK_H, max(16, pl.next_power_of_2(heads)))
        h_pad = pl.cdiv(heads, bh) * bh
        q, qr = (jnp.pad(x, ((0, 0), (0, h_pad - heads), (0, 0))) for x in (q, qr))
        grid_spec = pl.GridSpec(
            grid=(h_pad // bh, queries),
            in_specs=[pl.BlockSpec((None,), lambda h, i: (i,)), pl.BlockSpec((None, width), lambda h, i: (i, 0)),
                      pl.BlockSpec((None, bh, c), lambda h, i: (i, h, 0)),
                      pl.BlockSpec((None, bh, r), lambda h, i: (i, h, 0)),
                      pl.BlockSpec(kv_latent.shape, lambda h, i: (0, 0)),
                      pl.BlockSpec(k_rope.shape, lambda h, i: (0, 0))],
            out_specs=pl.BlockSpec((None, bh, c), lambda h, i: (i, h, 0)))
        out = pl.pallas_call(functools.partial(_gpu_kernel, **kw), grid_spec=grid_spec,
                             out_shape=jax.ShapeDtypeStruct((queries, h_pad, c), q_latent.dtype),
                             compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), interpret=interpret,
                             cost_estimate=cost, name="mla_sparse_decode")(counts, idx, q, qr, kv_latent, k_rope)
        return out[:, :heads].reshape(shape)
    block = pl.BlockSpec((None, 1, bk), lambda i, j, *_: (i, 0, j))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(queries, width // bk),
        in_specs=[pl.BlockSpec((None, 1, bk), lambda i, j, *_: (i, 0, j), memory_space=pltpu.SMEM), block,
                  pl.BlockSpec((None, heads, c), lambda i, j, *_: (i, 0, 0)),
                  pl.BlockSpec((None, heads, r), lambda i, j, *_: (i, 0, 0)),
                  pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((None, heads, c), lambda i, j, *_: (i, 0, 0)),
        scratch_shapes=[pltpu.VMEM((bk, 1, c), kv_latent.dtype), pltpu.VMEM((bk, 1, r), k_rope.dtype),
                        pltpu.SemaphoreType.DMA(()), pltpu.VMEM((heads, 1), jnp.float32),
                        pltpu.VMEM((heads, 1), jnp.float32), pltpu.VMEM((heads, c), jnp.float32)])
    out = pl.pallas_call(functools.partial(_tpu_kernel, **kw), grid_spec=grid_spec, out_shape=out_shape,
                         compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
                         interpret=interpret, cost_estimate=cost, name="mla_sparse_decode")(
        counts, idx[:, None], idx[:, None], q, qr, kv_latent[:, None], k_rope[:, None])
    return out.reshape(shape)
