"""Multi-head Latent Attention (V2 sec. 2.1, eq. 9-19).

  c_Q = RMSNorm(W_DQ h)              q = W_UQ c_Q  (or q = W_Q h when q_lora_rank is None)
  [c_KV; k_R] = W_DKV h              c_KV = RMSNorm(c_KV), k_R = RoPE(k_R) shared by all heads
  [k_C; v] = W_UKV c_KV              score = (q_C . k_C + RoPE(q_R) . k_R) * softmax_scale

Two equivalent forms sit side by side:
  naive:  decompress k_C and v for every cached token, then attend per head;
  absorb: q_C^T (W_UK c) = (W_UK^T q_C)^T c, so attention runs in the kv_lora_rank latent space
          and W_UV is applied after the weighted sum. Decoding caches only [c_KV; k_R].

With a LatentCache, the new tokens' [c_KV; k_R] are stored at their positions and attention runs over
the cache: naive for a prefill (compute-bound), absorbed for decoding (memory-bound), where
`decode_attention` picks the Pallas kernel (kernels_pallas.mla_decode) or the jnp form.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8 import fp8_matmul, model_format, stored_scales, stored_weight
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


def decode_form(choice: str) -> str:
    """`decode_attention` resolved: auto is the Pallas kernel on GPU/TPU and the jnp absorbed form on CPU."""
    if choice == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "absorb"
    return choice


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q [b, t, h, d] against per-head k [b, s, h, d] or shared k [b, s, d] -> [b, h, t, s]."""
    return jnp.einsum("bthd,bshd->bhts" if k.ndim == 4 else "bthd,bsd->bhts", q, k)


def _weighted(p: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.einsum("bhts,bshd->bthd" if v.ndim == 4 else "bhts,bsd->bthd", p, v)


def attend(qs: tuple[jax.Array, ...], ks: tuple[jax.Array, ...], v: jax.Array, mask: jax.Array, scale: float,
           chunk: int = 0) -> jax.Array:
    """softmax(scale * sum_i q_i k_i^T, masked) v, softmax in float32. mask [b, 1, t, s], True = keep.

    With chunk > 0 the queries go in blocks of `chunk`, each rematerialized in the backward pass, so
    at most [b, h, chunk, s] scores are live instead of [b, h, t, s] (t is padded to whole blocks)."""
    def block(q_block, mask_block):
        scores = sum(_scores(q, k) for q, k in zip(q_block, ks, strict=True)).astype(jnp.float32) * scale
        probs = jax.nn.softmax(jnp.where(mask_block, scores, -1e30), axis=-1)
        return _weighted(probs.astype(v.dtype), v)

    length = qs[0].shape[1]
    if not chunk or length <= chunk:
        return block(qs, mask)
    n = -(-length // chunk)
    pad = n * chunk - length  # extra query rows see nothing and are cut off again

    def split(x, axis):
        x = jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
        return jnp.moveaxis(x.reshape(*x.shape[:axis], n, chunk, *x.shape[axis + 1:]), axis, 0)

    out = jax.lax.map(jax.checkpoint(lambda args: block(*args)),
                      (tuple(split(q, 1) for q in qs), split(mask, 2)))
    return jnp.moveaxis(out, 0, 1).reshape(*qs[0].shape[:1], n * chunk, *out.shape[3:])[:, :length]


class MLA(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    absorb: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 cache: LatentCache | HeadCache | None = None, positions: jax.Array | None = None
                 ) -> tuple[jax.Array, LatentCache | HeadCache | None]:
        """x [batch, length, embed]; cos/sin [batch, length, rope/2]; mask [batch, 1, length, keys], True = keep.

        Without a cache the keys are x's own tokens. With one, x's entries are written at `positions`
        [batch, length] and the keys are the cache's first mask.shape[-1] slots. Returns (out, cache)."""
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
            k, v = (c[:, :mask.shape[-1]].astype(self.dtype) for c in cache)
            return out_proj(attend((jnp.concatenate([q_nope, q_rope], -1),), (k,), v, mask, scale, chunk)), cache
        form = "absorb" if self.absorb else "naive"
        if cache is not None:
            cache = store(cache, (c_kv, k_rope), positions)
            c_kv, k_rope = (c[:, :mask.shape[-1]].astype(self.dtype) for c in cache)
            form = "naive" if mask.shape[-1] == x.shape[1] else decode_form(cfg.decode_attention)
        if form in ("absorb", "pallas"):  # attend in the latent space: keys and values are c_KV itself
            q_latent = jnp.einsum("bthd,chd->bthc", q_nope, w_uk)
            if form == "pallas":  # the T new tokens are each row's last: lengths = last position + 1
                from kernels_pallas.mla_decode import mla_decode

                out_latent = mla_decode(q_latent, q_rope, c_kv, k_rope, positions[:, -1] + 1, scale)
            else:
                out_latent = attend((q_latent, q_rope), (c_kv, k_rope), c_kv, mask, scale, chunk)
            out = jnp.einsum("bthc,chd->bthd", out_latent, w_uv)
        else:
            if kw["fp8"]:  # W_UKV as the FP8 linear layer it is (kv_b_proj), its output split into k_C and v
                kv_up = fp8_matmul(c_kv, wkv_param.reshape(cfg.kv_lora_rank, -1), stored_scales(self, "wkv_b"),
                                   scale_fmt=kw["fp8"]).reshape(*c_kv.shape[:-1], heads, nope + dv)
                k_nope, v = kv_up[..., :nope], kv_up[..., nope:]
            else:
                k_nope = jnp.einsum("bsc,chd->bshd", c_kv, w_uk)
                v = jnp.einsum("bsc,chd->bshd", c_kv, w_uv)
            out = attend((q_nope, q_rope), (k_nope, k_rope), v, mask, scale, chunk)
        return out_proj(out), cache
