"""The latent KV cache (V2 sec. 2.1.3): per layer only c_KV [batch, max_len, kv_lora_rank] and the shared
roped key k_R [batch, max_len, qk_rope_head_dim], (512 + 64) values per token for V3 instead of MHA's
2 n_h d_h = 128 x (192 + 128). V3.2 (DSA) adds the lightning indexer's key, index_head_dim (128) values per token,
in the cache dtype or as E4M3 codes plus one float32 scale (dsa_fp8_indexer). Slot s of a row holds position s;
`lengths` counts each row's valid slots, and a slot at or past its row's length is dead, so rolling back is
lowering `lengths`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.mla import HeadCache, LatentCache


class Cache(NamedTuple):
    layers: tuple[LatentCache | HeadCache, ...]  # one per run of same-kind layers, stacked: [count, batch, ...]
    mtp: tuple[LatentCache | HeadCache, ...]  # one per MTP module: [batch, max_len, ...]
    lengths: jax.Array  # [batch] int32: slots of the main model's cache in use

    @property
    def max_len(self) -> int:
        return self.layers[0].c_kv.shape[-2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None,
               mtp: bool = True, layout: str = "latent") -> Cache:
    """An empty cache for `batch` rows of up to `max_len` tokens, in `dtype` (default: the compute dtype).
    mtp=False leaves out the MTP modules' caches (needed only for speculative decoding). layout="heads" keeps
    decompressed per-head K/V instead, as MHA would (a baseline for benchmarks)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    if layout not in ("latent", "heads"):
        raise ValueError(f"cache layout {layout!r}: choose latent or heads")

    def latent(*lead: int) -> LatentCache | HeadCache:
        if layout == "heads":
            heads = (*lead, batch, max_len, cfg.num_attention_heads)
            return HeadCache(jnp.zeros((*heads, cfg.qk_head_dim), dtype), jnp.zeros((*heads, cfg.v_head_dim), dtype))
        return latent_zeros(cfg, (*lead, batch, max_len), dtype)

    return Cache(layers=tuple(latent(count) for _, _, count in cfg.layer_segments),
                 mtp=tuple(latent() for _ in range(cfg.num_nextn_predict_layers if mtp else 0)),
                 lengths=jnp.zeros((batch,), jnp.int32))


def latent_zeros(cfg: ModelConfig, rows: tuple[int, ...], dtype: jnp.dtype) -> LatentCache:
    """An empty LatentCache whose leaves are [*rows, ...]: c_KV, k_R and, with DSA, the indexer key (and scale)."""
    index_k = index_scale = None
    if cfg.dsa:
        index_k = jnp.zeros((*rows, cfg.index_head_dim), jnp.float8_e4m3fn if cfg.dsa_fp8_indexer else dtype)
        index_scale = jnp.zeros((*rows, 1), jnp.float32) if cfg.dsa_fp8_indexer else None
    return LatentCache(jnp.zeros((*rows, cfg.kv_lora_rank), dtype), jnp.zeros((*rows, cfg.qk_rope_head_dim), dtype),
                       index_k, index_scale)


def cache_bytes_per_token(cfg: ModelConfig, dtype: jnp.dtype | str = jnp.bfloat16, mtp: bool = True,
                          layout: str = "latent") -> int:
    """Bytes init_cache holds per token of one row (MTP modules included unless mtp=False)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, 1, dtype, mtp, layout))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves((shapes.layers, shapes.mtp)))


def mha_cache_bytes_per_token(cfg: ModelConfig, dtype: jnp.dtype | str = jnp.bfloat16) -> int:
    """What standard MHA with the same heads caches (layout="heads", main model): per layer and head a key and
    a value, 2 n_h d_h with d_h the mean of qk_head_dim and v_head_dim."""
    return cache_bytes_per_token(cfg, dtype, mtp=False, layout="heads")


def constrain(cache: Cache) -> Cache:
    """Rows over the mesh's batch axes (a no-op outside a mesh and logical-axis rules)."""
    def rows(x: jax.Array, lead: int) -> jax.Array:
        return nn.with_logical_constraint(x, ("layers",) * lead + ("batch",) + (None,) * (x.ndim - lead - 1))

    return Cache(tuple(jax.tree_util.tree_map(lambda x: rows(x, 1), c) for c in cache.layers),
                 tuple(jax.tree_util.tree_map(lambda x: rows(x, 0), c) for c in cache.mtp), rows(cache.lengths, 0))
