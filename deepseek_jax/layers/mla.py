"""Multi-head Latent Attention (V2 sec. 2.1, eq. 9-19).

  c_Q = RMSNorm(W_DQ h)              q = W_UQ c_Q  (or q = W_Q h when q_lora_rank is None)
  [c_KV; k_R] = W_DKV h              c_KV = RMSNorm(c_KV), k_R = RoPE(k_R) shared by all heads
  [k_C; v] = W_UKV c_KV              score = (q_C . k_C + RoPE(q_R) . k_R) * softmax_scale

Two equivalent forms sit side by side:
  naive:  decompress k_C and v for every cached token, then attend per head;
  absorb: q_C^T (W_UK c) = (W_UK^T q_C)^T c, so attention runs in the kv_lora_rank latent space
          and W_UV is applied after the weighted sum. Decoding caches only [c_KV; k_R].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.layers.rope import apply_rope


def attend(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax in float32. scores [batch, heads, q_len, kv_len]; mask broadcastable, True = keep."""
    scores = jnp.where(mask, scores.astype(jnp.float32), -1e30)
    return jax.nn.softmax(scores, axis=-1)


class MLA(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32
    absorb: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x [batch, length, embed]; cos/sin [batch, length, rope/2]; mask [batch, 1, length, length]."""
        cfg = self.cfg
        heads, nope, rope, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        kw = dict(dtype=self.dtype, init_std=cfg.initializer_range)
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
        wkv_b = self.param("wkv_b", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("kv_lora", "heads", "head_dim")),
            (cfg.kv_lora_rank, heads, nope + dv), jnp.float32).astype(self.dtype)
        w_uk, w_uv = wkv_b[..., :nope], wkv_b[..., nope:]

        rope_scores = jnp.einsum("bthr,bsr->bhts", q_rope, k_rope)
        if self.absorb:
            q_latent = jnp.einsum("bthd,chd->bthc", q_nope, w_uk)
            scores = jnp.einsum("bthc,bsc->bhts", q_latent, c_kv) + rope_scores
            probs = attend(scores * cfg.softmax_scale, mask).astype(self.dtype)
            out = jnp.einsum("chd,bthc->bthd", w_uv, jnp.einsum("bhts,bsc->bthc", probs, c_kv))
        else:
            k_nope = jnp.einsum("bsc,chd->bshd", c_kv, w_uk)
            v = jnp.einsum("bsc,chd->bshd", c_kv, w_uv)
            scores = jnp.einsum("bthd,bshd->bhts", q_nope, k_nope) + rope_scores
            probs = attend(scores * cfg.softmax_scale, mask).astype(self.dtype)
            out = jnp.einsum("bhts,bshd->bthd", probs, v)
        return Linear(x.shape[-1], ("heads", "head_dim", "embed"), in_dims=2, name="o", **kw)(out)
