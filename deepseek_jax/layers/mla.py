"""Multi-head Latent Attention (V2 sec. 2.1, eq. 9-19).

  c_Q = RMSNorm(W_DQ h)              q = W_UQ c_Q  (or q = W_Q h when q_lora_rank is None)
  [c_KV; k_R] = W_DKV h              c_KV = RMSNorm(c_KV), k_R = RoPE(k_R) shared by all heads
  [k_C; v] = W_UKV c_KV              score = (q_C . k_C + RoPE(q_R) . k_R) * softmax_scale

Two equivalent forms sit side by side:
  naive:  decompress k_C and v for every cached token, then attend per head;
  absorb: q_C^T (W_UK c) = (W_UK^T q_C)^T c, so attention runs in the kv_lora_rank latent space
          and W_UV is applied after the weighted sum. Decoding caches only [c_KV; k_R].

Training and prefill run the naive form: the Pallas FlashAttention kernel (kernels_pallas.flash_attention) on
GPU/TPU, or jnp query blocks; both build the causal + document mask per block from positions and segment ids
(AttentionMask), never a [batch, 1, T, S] tensor. With a LatentCache, the new tokens' [c_KV; k_R] are stored at
their positions and attention runs over the cache: naive for a prefill (compute-bound), absorbed for decoding
(memory-bound), where `decode_attention` picks the Pallas kernel (kernels_pallas.mla_decode) or the jnp form.

DeepSeek Sparse Attention (V3.2, cfg.dsa): a lightning indexer (layers/indexer.py) picks index_topk keys per query,
and attention runs in the absorbed form over just those, gathered per block of queries: the MQA form of MLA, so
every head shares the selection, in O(T k) memory. With no more keys than index_topk every key is selected, which
is dense attention. The cache then also holds the indexer's keys.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.backend import resolve
from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8 import fp8_matmul, model_format, stored_scales, stored_weight
from deepseek_jax.layers import indexer as dsa
from deepseek_jax.layers.ep import BATCH_AXES
from deepseek_jax.layers.indexer import Index, Indexer
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.layers.rope import apply_rope
from deepseek_jax.sharding import length_shards, merge_length, split_length


class LatentCache(NamedTuple):
    """MLA's whole per-token cache (V2 eq. 10-14): c_KV [..., batch, max_len, kv_lora_rank], normalized, and
    the roped shared key k_R [..., batch, max_len, qk_rope_head_dim]. Slot s holds position s. With DSA also the
    indexer's key [..., index_head_dim] (E4M3 codes with one scale per token [..., 1] under dsa_fp8_indexer)."""

    c_kv: jax.Array
    k_rope: jax.Array
    index_k: jax.Array | None = None
    index_scale: jax.Array | None = None


class HeadCache(NamedTuple):
    """What MHA would cache instead, kept to measure the difference: per-head keys k [..., batch, max_len, heads,
    qk_head_dim] and values v [..., heads, v_head_dim], each token's decompressed once."""

    k: jax.Array
    v: jax.Array


class PagedCache(NamedTuple):
    """The latent cache in fixed-size pages (PagedAttention; FlashMLA's 64-token blocks): `pool` is a LatentCache
    whose leaves are [..., num_pages, page_size, ...], shared by every row, and `table` [..., batch, max_pages] maps
    row b's slot s to page table[b, s // page_size], offset s % page_size. An entry >= num_pages is no page:
    writes there drop and reads give zeros, so a row touches only the pages its table names.

    Inside the model a paged cache is read-only: a layer attends over its rows' pages gathered with its new
    entries stored in that copy, and returns just the new entries (a LatentCache [batch, length, ...]); the
    caller then writes every layer's at once with `store` (one in-place scatter into the donated pool, where a
    write per layer would copy the layer's whole pool every step)."""

    pool: LatentCache
    table: jax.Array

    @property
    def page_size(self) -> int:
        return self.pool.c_kv.shape[-2]


def _page_slots(cache: PagedCache, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(page, offset) of each slot in positions [batch, length]; slots past the table get page num_pages."""
    num_pages, size = cache.pool.c_kv.shape[-3], cache.page_size
    block = positions // size
    page = jnp.take_along_axis(cache.table, jnp.clip(block, 0, cache.table.shape[-1] - 1), -1)
    return jnp.where((block >= 0) & (block < cache.table.shape[-1]), page, num_pages), positions % size


def store(cache: LatentCache | HeadCache | PagedCache, new: tuple[jax.Array | None, ...], positions: jax.Array):
    """Write new entries [batch, length, ...] at slots `positions` [batch, length]; slots past max_len drop."""
    if isinstance(cache, PagedCache):  # pool leaves [*lead, pages, page_size, d], new [*lead, batch, length, d]
        page, offset = _page_slots(cache, positions)

        def write(c: jax.Array, n: jax.Array) -> jax.Array:
            at = (slice(None),) * (c.ndim - 3) + (page, offset)
            return c.at[at].set(n.astype(c.dtype), mode="drop")

        return PagedCache(LatentCache(*(None if c is None else write(c, n) for c, n in zip(cache.pool, new,
                                                                                          strict=True))), cache.table)
    rows = jnp.arange(positions.shape[0])[:, None]
    return type(cache)(*(None if c is None else c.at[rows, positions].set(n.astype(c.dtype), mode="drop")
                         for c, n in zip(cache, new, strict=True)))


def read(cache: LatentCache | HeadCache | PagedCache, kv_len: int) -> LatentCache | HeadCache:
    """The first kv_len slots of every row, contiguous [batch, kv_len, ...] (a paged cache gathers its pages)."""
    if not isinstance(cache, PagedCache):
        return type(cache)(*(None if c is None else c[:, :kv_len] for c in cache))
    pages = cache.table[:, :-(-kv_len // cache.page_size)]

    def gather(c: jax.Array) -> jax.Array:
        rows = c.at[pages].get(mode="fill", fill_value=0)  # [batch, pages, page_size, ...]
        return rows.reshape(rows.shape[0], -1, *rows.shape[3:])[:, :kv_len]

    return LatentCache(*(None if c is None else gather(c) for c in cache.pool))


_NEG = -1e30  # a finite -inf: a query that sees no key averages them all instead of giving NaN


class AttentionMask(NamedTuple):
    """Who sees whom, built block by block and never as a [batch, 1, T, S] tensor: query i of row b sees key j
    (the key in cache slot / sequence index j) iff j <= q_positions[b, i] and kv_segments[b, j] == q_segments[b, i].

    q_positions None means the queries are the keys themselves (training, prefill without a cache): query i
    sits at index i."""

    q_segments: jax.Array  # [batch, T] int32, document ids (0 = padding)
    kv_segments: jax.Array  # [batch, S] int32
    q_positions: jax.Array | None = None  # [batch, T] int32, each query's slot in the keys

    @classmethod
    def causal(cls, segment_ids: jax.Array) -> AttentionMask:
        """Packed rows: causal within each document."""
        return cls(segment_ids, segment_ids)

    @classmethod
    def over_cache(cls, positions: jax.Array, kv_len: int) -> AttentionMask:
        """New tokens at `positions` [batch, T] against a cache whose slot s holds position s (its first kv_len)."""
        return cls(jnp.zeros_like(positions), jnp.zeros((positions.shape[0], kv_len), positions.dtype), positions)

    @property
    def kv_len(self) -> int:
        return self.kv_segments.shape[1]

    def positions(self) -> jax.Array:
        """Each query's slot [batch, T]."""
        if self.q_positions is not None:
            return self.q_positions
        return jnp.broadcast_to(jnp.arange(self.q_segments.shape[1], dtype=jnp.int32), self.q_segments.shape)


def _keep(q_positions: jax.Array, q_segments: jax.Array, kv_segments: jax.Array) -> jax.Array:
    """[b, 1, t, s] True where query t sees key s: computed inside the consuming fusion, per block."""
    return dsa.visible(q_positions, q_segments, kv_segments)[:, None]


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q [b, t, h, d] against per-head k [b, s, h, d] or shared k [b, s, d] -> [b, h, t, s] in float32."""
    return jnp.einsum("bthd,bshd->bhts" if k.ndim == 4 else "bthd,bsd->bhts", q, k,
                      preferred_element_type=jnp.float32)


def _weighted(p: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.einsum("bhts,bshd->bthd" if v.ndim == 4 else "bhts,bsd->bthd", p, v, preferred_element_type=jnp.float32)


def _softmax_attention(q, k, v, q_positions, q_segments, kv_segments, scale: float) -> jax.Array:
    """softmax(scale q k^T | mask) v: scores and statistics in float32, exp(s - max) in v's dtype for the PV
    product, and the 1 / sum normalisation applied to the [t, dv] output rather than the [t, s] probabilities.

    The mask's inputs pass an optimization barrier with q: the mask then counts as depending on q, so autodiff
    rebuilds it next to the scores instead of precomputing it for every block or layer as a saved residual."""
    q, q_positions, q_segments, kv_segments = jax.lax.optimization_barrier((q, q_positions, q_segments, kv_segments))
    keep = _keep(q_positions, q_segments, kv_segments)
    s = jnp.where(keep, _scores(q, k) * scale, _NEG)
    e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
    denom = jnp.moveaxis(e.sum(-1), 1, 2)[..., None]  # [b, t, h, 1]
    return (_weighted(e.astype(v.dtype), v) / denom).astype(v.dtype)


def query_blocks(fn, chunk: int, *xs: jax.Array):
    """fn(*blocks) over blocks of `chunk` queries (axis 1 of every x), one lax.map step each, rematerialized in the
    backward pass; the outputs (a pytree of [b, chunk, ...]) joined again along axis 1. No more queries than chunk
    (per context shard), or chunk = 0: one call on everything. Under context parallelism each step takes one block
    of every shard's queries (sharding.split_length), so every device works on its own queries."""
    length = xs[0].shape[1]
    if not chunk or length // length_shards() <= chunk:
        return fn(*xs)

    def block(args):
        args = [nn.with_logical_constraint(a, ("batch", "length") + (None,) * (a.ndim - 2)) for a in args]
        return fn(*args)

    out = jax.lax.map(jax.checkpoint(block), tuple(split_length(x, chunk) for x in xs))
    return jax.tree_util.tree_map(lambda o: merge_length(o, length), out)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float, chunk: int = 0) -> jax.Array:
    """softmax(scale * q k^T, masked) v. q [b, t, h, d]; k and v per head [b, s, h, .] or shared [b, s, .].

    With chunk > 0 the queries go in blocks of `chunk` (query_blocks), so at most [b, h, chunk, s] scores are live.
    Every block reads every key: skipping the fully masked key blocks of a causal product is the Pallas kernel's job
    (unrolled blocks of different widths let XLA:CPU overlap their rematerializations, doubling peak memory at 4k
    tokens)."""
    def block(q_blk, pos, seg):
        return _softmax_attention(q_blk, k, v, pos, seg, mask.kv_segments, scale)

    return query_blocks(block, chunk, q, mask.positions(), mask.q_segments)


class IndexKeys(NamedTuple):
    """The keys the indexer scores: k [b, S, d^I] (E4M3 codes when scale [b, S, 1] is given), and the
    full-precision keys the training KL reads (None at inference)."""

    k: jax.Array
    scale: jax.Array | None = None
    exact: jax.Array | None = None


def attend_selected(q: jax.Array, kv: jax.Array, index: Index, keys: IndexKeys, mask: AttentionMask,
                    cfg: ModelConfig, kl: bool = False) -> tuple[jax.Array, jax.Array]:
    """DSA's main attention over the selected keys, absorbed form. q [b, t, h, C + R] ([W_UK^T q_C; q_R]); kv
    [b, S, C + R] ([c_KV; k_R], the values are c_KV); per block of attention_chunk queries: select each query's
    keys (indexer.select), gather their latents [b, chunk, K, C + R] and attend. Returns (out_latent [b, t, h, C],
    per-query KL(p_main || softmax(I)) over the selected keys [b, t], zeros unless kl)."""
    rows = jnp.arange(q.shape[0])[:, None, None]
    c = cfg.kv_lora_rank

    def block(q_blk, iq, iw, pos, seg):
        slots, valid = dsa.select(iq, iw, keys.k, keys.scale, pos, seg, mask.kv_segments, cfg.index_topk,
                                  cfg.index_key_block, cfg.dsa_fp8_indexer)
        kv_sel = kv[rows, slots]  # [b, t, K, C + R]
        s = jnp.einsum("bthd,btkd->bhtk", q_blk, kv_sel, preferred_element_type=jnp.float32) * cfg.softmax_scale
        s = jnp.where(valid[:, None], s, _NEG)
        e = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
        denom = e.sum(-1)  # [b, h, t]
        out = jnp.einsum("bhtk,btkc->bthc", e.astype(kv.dtype), kv_sel[..., :c], preferred_element_type=jnp.float32)
        out = (out / jnp.moveaxis(denom, 1, 2)[..., None]).astype(q.dtype)
        if not kl:
            return out, jnp.zeros(pos.shape, jnp.float32)
        p_main = jnp.mean(e / denom[..., None], axis=1)  # summed over heads, L1-normalized
        logits = dsa.selected_scores(iq, iw, keys.exact[rows, slots])
        return out, dsa.kl_to_main(p_main, logits, valid)

    return query_blocks(block, cfg.attention_chunk, q, index.q, index.w, mask.positions(), mask.q_segments)


def dense_index_loss(q: jax.Array, kv: jax.Array, index: Index, mask: AttentionMask, cfg: ModelConfig,
                     mass: bool = False) -> tuple[jax.Array, jax.Array]:
    """The dense warm-up's indexer loss: per query KL(p_main || softmax(I)) over every visible key [b, t], p_main the
    (absorbed-form) attention q [b, t, h, C + R] over kv [b, S, C + R] summed over heads and L1-normalized; and
    with mass=True the share of p_main on the indexer's index_topk keys [b, t] (else zeros)."""
    keys = IndexKeys(index.k)

    def block(q_blk, iq, iw, pos, seg):
        keep = _keep(pos, seg, mask.kv_segments)
        p = jax.nn.softmax(jnp.where(keep, _scores(q_blk, kv) * cfg.softmax_scale, _NEG), axis=-1).mean(1)
        vis = keep[:, 0]
        loss = dsa.kl_to_main(p, dsa.scores(iq, iw, index.k), vis)
        if not mass:
            return loss, jnp.zeros_like(loss)
        slots, valid = dsa.select(iq, iw, keys.k, None, pos, seg, mask.kv_segments, cfg.index_topk,
                                  cfg.index_key_block, cfg.dsa_fp8_indexer)
        return loss, jnp.sum(jnp.where(valid, jnp.take_along_axis(p, slots, axis=-1), 0.0), axis=-1)

    return query_blocks(block, cfg.attention_chunk, q, index.q, index.w, mask.positions(), mask.q_segments)


def per_shard(fn, *args: jax.Array, specs: tuple[str, ...], out: str) -> jax.Array:
    """fn(*args), under a mesh once per shard: a pallas_call cannot be partitioned by XLA. Each spec names an
    argument's dims: "b" rows over the batch axes, "h" heads over `tensor`, "." whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    axis = {"b": rows, "h": "tensor" if "tensor" in mesh.axis_names else None, ".": None}
    spec = lambda dims: P(*(axis[d] for d in dims))
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(spec, specs)), out_specs=spec(out), check_vma=False)(*args)


def flash(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float) -> jax.Array:
    """attend() through the Pallas FlashAttention kernel (per-head k and v), per shard under a mesh."""
    from kernels_pallas.flash_attention import flash_attention

    return per_shard(functools.partial(flash_attention, scale=scale), q, k, v, mask.positions(), mask.q_segments,
                     mask.kv_segments, specs=("b.h.",) * 3 + ("b.",) * 3, out="b.h.")


def _whole(x: jax.Array) -> jax.Array:
    """Keys gathered over the sequence (rows stay split): under context parallelism an all-gather of the latents
    (576 values per token for V3) and the indexer keys (128), not of per-head K/V."""
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


class MLA(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    absorb: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask,
                 cache: LatentCache | HeadCache | None = None, positions: jax.Array | None = None
                 ) -> tuple[jax.Array, LatentCache | HeadCache | None]:
        """x [batch, length, embed]; cos/sin [batch, length, rope/2]; mask: who sees whom (x's tokens or the cache's).

        Without a cache the keys are x's own tokens. With one, x's entries are written at `positions`
        [batch, length] and the keys are the cache's first mask.kv_len slots. Returns (out, cache)."""
        cfg = self.cfg
        heads, nope, rope, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        kw = dict(dtype=self.dtype, init_std=cfg.initializer_range, fp8=model_format(cfg))
        norm = dict(eps=1e-6)  # the latent norms use 1e-6 whatever rms_norm_eps says, as released

        if cfg.q_lora_rank:
            c_q = RMSNorm(**norm, axis_name="q_lora", name="q_a_norm")(
                Linear(cfg.q_lora_rank, ("embed", "q_lora"), name="q_a", **kw)(x))
            q = Linear((heads, nope + rope), ("q_lora", "heads", "head_dim"), name="q_b", **kw)(c_q)
        else:
            q = Linear((heads, nope + rope), ("embed", "heads", "head_dim"), name="q", **kw)(x)
        q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin)

        kv = Linear(cfg.kv_lora_rank + rope, ("embed", "kv_lora"), name="kv_a", **kw)(x)
        c_kv = RMSNorm(**norm, axis_name="kv_lora", name="kv_a_norm")(kv[..., :cfg.kv_lora_rank])
        k_rope = apply_rope(kv[..., None, cfg.kv_lora_rank:], cos, sin)[..., 0, :]
        wkv_param = self.param("wkv_b", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("kv_lora", "heads", "head_dim")),
            (cfg.kv_lora_rank, heads, nope + dv), jnp.float32)
        wkv_b = stored_weight(self, "wkv_b", wkv_param).astype(self.dtype)
        w_uk, w_uv = wkv_b[..., :nope], wkv_b[..., nope:]
        out_proj = Linear(x.shape[-1], ("heads", "head_dim", "embed"), in_dims=2, name="o", **kw)

        scale, chunk = cfg.softmax_scale, cfg.attention_chunk
        index = Indexer(cfg, self.dtype, name="indexer")(x, c_q, cos, sin) if cfg.dsa else None
        if isinstance(cache, HeadCache):  # MHA's cache: each new token's K/V decompressed once, stored per head
            if cfg.dsa:
                raise ValueError("DSA selects latent cache slots; use the latent cache layout, not 'heads'")
            k_nope, v = jnp.einsum("bsc,chd->bshd", c_kv, w_uk), jnp.einsum("bsc,chd->bshd", c_kv, w_uv)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:-1], rope))], -1)
            cache = store(cache, (k, v), positions)
            k, v = (c.astype(self.dtype) for c in read(cache, mask.kv_len))
            return out_proj(attend(jnp.concatenate([q_nope, q_rope], -1), k, v, mask, scale, chunk)), cache
        if cache is None and length_shards() > 1:  # context parallel: every query block may need every key
            c_kv, k_rope, mask = _whole(c_kv), _whole(k_rope), mask._replace(kv_segments=_whole(mask.kv_segments))
            index = None if index is None else index._replace(k=_whole(index.k))
        keys = None if index is None else IndexKeys(*dsa.cached_keys(index.k, cfg.dsa_fp8_indexer, self.dtype),
                                                    exact=index.k)
        form = "absorb" if self.absorb else "naive"
        if isinstance(cache, PagedCache):  # read-only here: the caller writes the new entries returned
            new = LatentCache(c_kv, k_rope, *(keys[:2] if keys else (None, None)))
            c_kv, k_rope, index_k, index_scale = store(read(cache, mask.kv_len), new, positions)
            cache = new
        elif cache is not None:
            cache = store(cache, (c_kv, k_rope, *(keys[:2] if keys else (None, None))), positions)
            c_kv, k_rope, index_k, index_scale = read(cache, mask.kv_len)
        if cache is not None:
            c_kv, k_rope = c_kv.astype(self.dtype), k_rope.astype(self.dtype)
            keys = None if index is None else IndexKeys(index_k, index_scale)
            form = "naive" if mask.kv_len == x.shape[1] else resolve("decode_attention", cfg.decode_attention)
        stats = cfg.dsa and self.is_mutable_collection("indexer_stats")
        counted = (mask.q_segments != 0).astype(jnp.float32)  # padding queries carry no indexer loss

        def sow(name: str, per_query: jax.Array) -> None:
            self.sow("indexer_stats", name, jnp.sum(per_query * counted) / jnp.maximum(counted.sum(), 1.0),
                     reduce_fn=lambda _, new: new)

        if cfg.dsa and cfg.dsa_mode == "sparse" and mask.kv_len > cfg.index_topk:  # DSA: the selected keys only
            q_latent = jnp.concatenate([jnp.einsum("bthd,chd->bthc", q_nope, w_uk), q_rope], -1)
            if form == "pallas":  # decoding: select here, gather and attend in the kernel
                from kernels_pallas.mla_sparse_decode import mla_sparse_decode

                slots, valid = dsa.select(index.q, index.w, keys.k, keys.scale, mask.positions(), mask.q_segments,
                                          mask.kv_segments, cfg.index_topk, cfg.index_key_block, cfg.dsa_fp8_indexer)
                out_latent = per_shard(functools.partial(mla_sparse_decode, softmax_scale=scale),
                                       q_latent[..., :cfg.kv_lora_rank], q_rope, c_kv, k_rope,
                                       jnp.where(valid, slots, -1), specs=("b.h.", "b.h.", "b..", "b..", "b.."),
                                       out="b.h.")
            else:
                out_latent, kl = attend_selected(q_latent, jnp.concatenate([c_kv, k_rope], -1), index, keys, mask,
                                                 cfg, kl=stats)
                if stats:
                    sow("kl", kl)
            return out_proj(jnp.einsum("bthc,chd->bthd", out_latent, w_uv)), cache
        if stats:  # dense attention (the warm-up, or no more keys than index_topk): the KL over every visible key
            q_latent = jnp.concatenate([jnp.einsum("bthd,chd->bthc", q_nope, w_uk), q_rope], -1)
            kl, mass = dense_index_loss(q_latent, jnp.concatenate([c_kv, k_rope], -1), index, mask, cfg,
                                        mass=cfg.dsa_mode == "dense")
            sow("kl", kl)
            if cfg.dsa_mode == "dense":
                sow("mass", mass)
        if form in ("absorb", "pallas"):  # attend in the latent space: keys and values are c_KV itself
            q_latent = jnp.einsum("bthd,chd->bthc", q_nope, w_uk)
            if form == "pallas":  # the T new tokens are each row's last: lengths = last position + 1
                from kernels_pallas.mla_decode import mla_decode

                out_latent = per_shard(functools.partial(mla_decode, softmax_scale=scale), q_latent, q_rope, c_kv,
                                       k_rope, positions[:, -1] + 1, specs=("b.h.", "b.h.", "b..", "b..", "b"),
                                       out="b.h.")
            else:
                out_latent = attend(jnp.concatenate([q_latent, q_rope], -1), jnp.concatenate([c_kv, k_rope], -1),
                                    c_kv, mask, scale, chunk)
            out = jnp.einsum("bthc,chd->bthd", out_latent, w_uv)
        else:
            if kw["fp8"]:  # W_UKV as the FP8 linear layer it is (kv_b_proj), its output split into k_C and v
                kv_up = fp8_matmul(c_kv, wkv_param.reshape(cfg.kv_lora_rank, -1), stored_scales(self, "wkv_b"),
                                   scale_fmt=kw["fp8"]).reshape(*c_kv.shape[:-1], heads, nope + dv)
                k_nope, v = kv_up[..., :nope], kv_up[..., nope:]
            else:
                k_nope = jnp.einsum("bsc,chd->bshd", c_kv, w_uk)
                v = jnp.einsum("bsc,chd->bshd", c_kv, w_uv)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:-1], rope))], -1)
            q = jnp.concatenate([q_nope, q_rope], -1)
            if resolve("attention_impl", cfg.attention_impl) == "pallas":
                out = flash(q, k, v, mask, scale)
            else:
                out = attend(q, k, v, mask, scale, chunk)
        return out_proj(out), cache
