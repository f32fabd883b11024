"""The latent KV cache (V2 sec. 2.1.3): per layer only c_KV [batch, max_len, kv_lora_rank] and the shared
roped key k_R [batch, max_len, qk_rope_head_dim], (512 + 64) values per token for V3 instead of MHA's
2 n_h d_h = 128 x (192 + 128). Slot s of a row holds position s; `lengths` counts each row's valid slots,
and a slot at or past its row's length is dead, so rolling back is lowering `lengths`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.mla import LatentCache


class Cache(NamedTuple):
    layers: tuple[LatentCache, ...]  # one per run of same-kind layers, stacked: [count, batch, max_len, dim]
    mtp: tuple[LatentCache, ...]  # one per MTP module: [batch, max_len, dim]
    lengths: jax.Array  # [batch] int32: slots of the main model's cache in use

    @property
    def max_len(self) -> int:
        return self.layers[0].c_kv.shape[-2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None,
               mtp: bool = True) -> Cache:
    """An empty cache for `batch` rows of up to `max_len` tokens, in `dtype` (default: the compute dtype).
    mtp=False leaves out the MTP modules' caches (needed only for speculative decoding)."""
    dtype = jnp.dtype(dtype or cfg.dtype)

    def latent(*lead: int) -> LatentCache:
        return LatentCache(jnp.zeros((*lead, batch, max_len, cfg.kv_lora_rank), dtype),
                           jnp.zeros((*lead, batch, max_len, cfg.qk_rope_head_dim), dtype))

    return Cache(layers=tuple(latent(count) for _, _, count in cfg.layer_segments),
                 mtp=tuple(latent() for _ in range(cfg.num_nextn_predict_layers if mtp else 0)),
                 lengths=jnp.zeros((batch,), jnp.int32))


def cache_bytes_per_token(cfg: ModelConfig, dtype: jnp.dtype | str = jnp.bfloat16, mtp: bool = True) -> int:
    """Bytes init_cache holds per token of one row (MTP modules included unless mtp=False)."""
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, 1, dtype, mtp))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves((shapes.layers, shapes.mtp)))


def mha_cache_bytes_per_token(cfg: ModelConfig, dtype: jnp.dtype | str = jnp.bfloat16) -> int:
    """What standard MHA with the same heads would cache: per layer, per head, a key and a value."""
    per_head = cfg.qk_head_dim + cfg.v_head_dim
    return cfg.num_hidden_layers * cfg.num_attention_heads * per_head * jnp.dtype(dtype).itemsize


def constrain(cache: Cache) -> Cache:
    """Rows over the mesh's batch axes (a no-op outside a mesh and logical-axis rules)."""
    def rows(x: jax.Array) -> jax.Array:
        names = ("layers",) * (x.ndim - 3) + ("batch", "length", None)
        return nn.with_logical_constraint(x, names[-x.ndim:] if x.ndim >= 3 else ("batch",))

    return jax.tree_util.tree_map(rows, cache)
