"""DeepSeek Sparse Attention's lightning indexer (V3.2 sec. 2.1, eq. 1-2) and the top-k selection it drives.

  q^I_{t,j} = (W^{IQ} c^Q_t)_j     k^I_s = LayerNorm(W^{IK} h_s)     w_{t,j} = (W^w h_t)_j / sqrt(H^I)
  I_{t,s} = sum_j w_{t,j} ReLU(q^I_{t,j} . k^I_s) / sqrt(d^I)                                          (eq. 1)

c^Q is MLA's normalized query latent; the key is one d^I-wide vector per token shared by the H^I index heads (MQA).
The first qk_rope_head_dim dims of q^I and k^I carry RoPE, rotated in halves (not MLA's interleaved pairs). Each
query then attends to the index_topk keys with the largest I_{t,s} among those it may see (causal, same document),
or to all of them when it sees fewer (eq. 2). The selection runs over blocks of keys with a running top-k, so no
[T, T] score matrix exists.

The released code's FP8 path (dsa_fp8_indexer): q^I and k^I are rotated by the normalized Hadamard matrix H
(H H^T = 1, so exact scores do not change) and quantized to E4M3 in 1x128 tiles (s = amax / 448); the score is
sum_j w_{t,j} s^q_{t,j} ReLU(q8_{t,j} . k8_s) s^k_s / sqrt(d^I), and the key cache holds k8 and s^k.

Training (V3.2 sec. 2.1): L^I = sum_t KL(p_{t,:} || softmax(I_{t,:})), with p the main attention's distribution
summed over heads and L1-normalized: over every visible key in the dense warm-up, over the selected keys in sparse
training. The indexer's inputs are detached, so L^I trains the indexer and the LM loss everything else.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8 import quantize_activations
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.norm import LayerNorm
from deepseek_jax.layers.rope import apply_rope_halves

NEG = -1e30  # a finite -inf for keys a query may not see


class Index(NamedTuple):
    """One layer's indexer outputs for the new tokens: queries q [b, t, H^I, d^I] and head weights w [b, t, H^I]
    (float32), keys k [b, t, d^I] (Hadamard-rotated when fp8)."""

    q: jax.Array
    w: jax.Array
    k: jax.Array


@functools.cache
def hadamard(n: int) -> np.ndarray:
    """The Sylvester-Hadamard matrix of size n (a power of two), normalized: H H^T = I."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


class Indexer(nn.Module):
    """x [batch, length, embed] (MLA's normed input) and c_q [batch, length, q_lora_rank] -> Index, both detached."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c_q: jax.Array, cos: jax.Array, sin: jax.Array) -> Index:
        cfg = self.cfg
        heads, dim, rope = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        x, c_q = jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q)
        kw = dict(dtype=self.dtype, init_std=cfg.initializer_range)
        q = Linear((heads, dim), ("q_lora", "heads", "head_dim"), name="wq_b", **kw)(c_q)
        k = LayerNorm(1e-6, name="k_norm")(Linear(dim, ("embed", None), name="wk", **kw)(x))
        q = jnp.concatenate([apply_rope_halves(q[..., :rope], cos, sin), q[..., rope:]], -1)
        k = jnp.concatenate([apply_rope_halves(k[..., None, :rope], cos, sin)[..., 0, :], k[..., rope:]], -1)
        # head weights in float32 (transformers keeps weights_proj in fp32)
        w = Linear(heads, ("embed", "heads"), dtype=jnp.float32, init_std=cfg.initializer_range,
                   name="weights_proj")(x.astype(jnp.float32)) * heads ** -0.5
        if cfg.dsa_fp8_indexer:
            rotate = jnp.asarray(hadamard(dim))
            q, k = (jnp.einsum("...d,de->...e", a.astype(jnp.float32), rotate).astype(a.dtype) for a in (q, k))
        return Index(q.astype(jnp.float32), w, k)


def cached_keys(k: jax.Array, fp8: bool, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array | None]:
    """What the key cache holds for keys k [..., d^I]: E4M3 codes and one scale per token [..., 1] (fp8), or k in
    `dtype` and no scale."""
    if fp8:
        return quantize_activations(k)
    return k.astype(dtype), None


def scores(index_q: jax.Array, w: jax.Array, k: jax.Array, k_scale: jax.Array | None = None,
           fp8: bool = False) -> jax.Array:
    """I_{t,s} (eq. 1) of queries [b, t, H, d] (weights [b, t, H]) against keys k [b, s, d] -> [b, t, s] float32.
    fp8: E4M3 scoring; k holds codes with k_scale [b, s, 1], or high-precision keys quantized here."""
    dim = index_q.shape[-1]
    if fp8:
        if k_scale is None:
            k, k_scale = quantize_activations(k)
        index_q, q_scale = quantize_activations(index_q)  # one scale per (token, head): d^I = 128
        w = w * q_scale[..., 0]
    dots = jnp.einsum("bthd,bsd->bths", index_q, k.astype(index_q.dtype), preferred_element_type=jnp.float32)
    out = jnp.einsum("bth,bths->bts", w, jax.nn.relu(dots)) * dim ** -0.5
    return out if k_scale is None else out * k_scale[..., 0].astype(jnp.float32)[:, None, :]


def visible(q_positions: jax.Array, q_segments: jax.Array, kv_segments: jax.Array, start: int | jax.Array = 0
            ) -> jax.Array:
    """[b, t, s] True where query t (at slot q_positions) may see key start + s: causal and same document."""
    slots = start + jnp.arange(kv_segments.shape[1])
    return (slots <= q_positions[..., None]) & (q_segments[..., None] == kv_segments[:, None, :])


def select(index_q: jax.Array, w: jax.Array, k: jax.Array, k_scale: jax.Array | None, q_positions: jax.Array,
           q_segments: jax.Array, kv_segments: jax.Array, topk: int, key_block: int = 0, fp8: bool = False
           ) -> tuple[jax.Array, jax.Array]:
    """The keys each query attends to (eq. 2): (slots [b, t, K] int32, valid [b, t, K]) with K = min(topk, S),
    the K visible keys of largest I_{t,s}; a query that sees fewer than K keys has them all, the rest invalid.
    key_block > 0 scores `key_block` keys at a time, merging each block into a running top-k."""
    n_keys = k.shape[1]
    kk = min(topk, n_keys)
    index_q, w = jax.lax.stop_gradient(index_q), jax.lax.stop_gradient(w)

    def block_scores(start, k_blk, scale_blk, seg_blk):
        s = scores(index_q, w, k_blk, scale_blk, fp8)
        return jnp.where(visible(q_positions, q_segments, seg_blk, start), s, NEG)

    if not key_block or n_keys <= key_block:
        vals, slots = jax.lax.top_k(block_scores(0, k, k_scale, kv_segments), kk)
        return slots.astype(jnp.int32), vals > NEG / 2

    n_blocks = -(-n_keys // key_block)
    pad = n_blocks * key_block - n_keys

    def blocks(x, fill=0):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(x.shape[0], n_blocks, key_block, *x.shape[2:]), 1, 0)

    xs = (jnp.arange(n_blocks) * key_block, blocks(k), None if k_scale is None else blocks(k_scale),
          blocks(kv_segments, fill=-1))  # padded keys sit in no document

    def merge(carry, blk):
        vals, slots = carry
        start = blk[0]
        s = block_scores(start, *blk[1:])
        cand_vals = jnp.concatenate([vals, s], axis=-1)
        cand_slots = jnp.concatenate([slots, jnp.broadcast_to(start + jnp.arange(key_block, dtype=jnp.int32),
                                                              s.shape)], axis=-1)
        vals, pick = jax.lax.top_k(cand_vals, kk)
        return (vals, jnp.take_along_axis(cand_slots, pick, axis=-1)), None

    shape = (*index_q.shape[:2], kk)
    init = (jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.int32))
    (vals, slots), _ = jax.lax.scan(merge, init, xs)
    return slots, vals > NEG / 2


def kl_to_main(p_main: jax.Array, index_logits: jax.Array, valid: jax.Array) -> jax.Array:
    """KL(p || softmax(I)) per query over its valid keys: p_main [b, t, s] (rows summing to 1 over valid keys,
    treated as a constant), index_logits [b, t, s] -> [b, t] float32."""
    p = jax.lax.stop_gradient(jnp.where(valid, p_main, 0.0))
    log_q = jax.nn.log_softmax(jnp.where(valid, index_logits, NEG), axis=-1)
    return jnp.sum(jax.scipy.special.xlogy(p, p) - jnp.where(valid, p * log_q, 0.0), axis=-1)


def selected_scores(index_q: jax.Array, w: jax.Array, k_sel: jax.Array) -> jax.Array:
    """I_{t,s} at each query's own selected keys k_sel [b, t, K, d] -> [b, t, K] float32 (full precision)."""
    dots = jnp.einsum("bthd,btkd->bthk", index_q, k_sel.astype(index_q.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("bth,bthk->btk", w, jax.nn.relu(dots)) * index_q.shape[-1] ** -0.5
