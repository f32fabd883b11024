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
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8 import fp8_matmul, model_format, stored_scales, stored_weight
from deepseek_jax.layers.ep import BATCH_AXES
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.layers.rope import apply_rope


class LatentCache(NamedTuple):
    """MLA's whole per-token cache (V2 eq. 10-14): c_KV [..., batch, max_len, kv_lora_rank], normalized, and
    the roped shared key k_R [..., batch, max_len, qk_rope_head_dim]. Slot s holds position s."""

    c_kv: jax.Array
    k_rope: jax.Array


class HeadCache(NamedTuple):
    """What MHA would cache instead, kept to measure the difference: per-head keys k [..., batch, max_len, heads,
    qk_head_dim] and values v [..., heads, v_head_dim], each token's decompressed once."""

    k: jax.Array
    v: jax.Array


def store(cache: LatentCache | HeadCache, new: tuple[jax.Array, ...], positions: jax.Array):
    """Write new entries [batch, length, ...] at slots `positions` [batch, length]; slots past max_len drop."""
    rows = jnp.arange(positions.shape[0])[:, None]
    return type(cache)(*(c.at[rows, positions].set(n.astype(c.dtype), mode="drop") for c, n in zip(cache, new,
                                                                                                     strict=True)))


def _by_backend(choice: str, accelerated: str, cpu: str) -> str:
    if choice == "auto":
        return accelerated if jax.default_backend() in ("gpu", "tpu") else cpu
    return choice


def decode_form(choice: str) -> str:
    """`decode_attention` resolved: auto is the Pallas kernel on GPU/TPU and the jnp absorbed form on CPU."""
    return _by_backend(choice, "pallas", "absorb")


def attention_form(choice: str) -> str:
    """`attention_impl` resolved: auto is the Pallas flash kernel on GPU/TPU and the jnp query blocks on CPU."""
    return _by_backend(choice, "pallas", "xla")


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
    causal = jnp.arange(kv_segments.shape[1]) <= q_positions[..., None]
    return (causal & (q_segments[..., None] == kv_segments[:, None, :]))[:, None]


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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float, chunk: int = 0) -> jax.Array:
    """softmax(scale * q k^T, masked) v. q [b, t, h, d]; k and v per head [b, s, h, .] or shared [b, s, .].

    With chunk > 0 the queries go in blocks of `chunk` (one lax.map step each, rematerialized in the backward
    pass), so at most [b, h, chunk, s] scores are live. Every block reads every key: skipping the fully masked key
    blocks of a causal product is the Pallas kernel's job (unrolled blocks of different widths let XLA:CPU overlap
    their rematerializations, doubling peak memory at 4k tokens)."""
    length = q.shape[1]
    if not chunk or length <= chunk:
        return _softmax_attention(q, k, v, mask.positions(), mask.q_segments, mask.kv_segments, scale)
    n = -(-length // chunk)
    pad = n * chunk - length  # extra query rows are cut off again

    def split(x):
        x = jnp.pad(x, [(0, pad if a == 1 else 0) for a in range(x.ndim)])
        return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

    def block(args):
        q_blk, pos, seg = args
        return _softmax_attention(q_blk, k, v, pos, seg, mask.kv_segments, scale)

    out = jax.lax.map(jax.checkpoint(block), (split(q), split(mask.positions()), split(mask.q_segments)))
    return jnp.moveaxis(out, 0, 1).reshape(q.shape[0], n * chunk, *out.shape[3:])[:, :length]


def flash(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float) -> jax.Array:
    """attend() through the Pallas FlashAttention kernel (per-head k and v). Under a mesh it runs per shard
    (rows over the batch axes, heads over `tensor`), as a pallas_call cannot be partitioned by XLA."""
    from kernels_pallas.flash_attention import flash_attention

    fn = functools.partial(flash_attention, scale=scale)
    args = (q, k, v, mask.positions(), mask.q_segments, mask.kv_segments)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    per_head = P(rows, None, "tensor" if "tensor" in mesh.axis_names else None, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(per_head,) * 3 + (P(rows, None),) * 3, out_specs=per_head,
                         check_vma=False)(*args)


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
        if isinstance(cache, HeadCache):  # MHA's cache: each new token's K/V decompressed once, stored per head
            k_nope, v = jnp.einsum("bsc,chd->bshd", c_kv, w_uk), jnp.einsum("bsc,chd->bshd", c_kv, w_uv)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], (*k_nope.shape[:-1], rope))], -1)
            cache = store(cache, (k, v), positions)
            k, v = (c[:, :mask.kv_len].astype(self.dtype) for c in cache)
            return out_proj(attend(jnp.concatenate([q_nope, q_rope], -1), k, v, mask, scale, chunk)), cache
        form = "absorb" if self.absorb else "naive"
        if cache is not None:
            cache = store(cache, (c_kv, k_rope), positions)
            c_kv, k_rope = (c[:, :mask.kv_len].astype(self.dtype) for c in cache)
            form = "naive" if mask.kv_len == x.shape[1] else decode_form(cfg.decode_attention)
        if form in ("absorb", "pallas"):  # attend in the latent space: keys and values are c_KV itself
            q_latent = jnp.einsum("bthd,chd->bthc", q_nope, w_uk)
            if form == "pallas":  # the T new tokens are each row's last: lengths = last position + 1
                from kernels_pallas.mla_decode import mla_decode

                out_latent = mla_decode(q_latent, q_rope, c_kv, k_rope, positions[:, -1] + 1, scale)
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
            if attention_form(cfg.attention_impl) == "pallas":
                out = flash(q, k, v, mask, scale)
            else:
                out = attend(q, k, v, mask, scale, chunk)
        return out_proj(out), cache
