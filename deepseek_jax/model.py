"""DeepSeek-V3 (arXiv 2412.19437) as a Flax Linen module.

  tokens -> embed -> dense blocks -> MoE blocks -> RMSNorm -> head        (main model)
  h^k = TRM_k(M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1})]) -> head      (MTP module k, V3 eq. 21-23)

A block is h += MLA(RMSNorm(h)); h += FFN(RMSNorm(h)), with FFN a SwiGLU MLP in the first
`first_k_dense_replace` layers and DeepSeekMoE after. Each run of same-kind blocks is one
`nn.scan`, so compile time does not grow with depth. Embedding and output head are shared with
the MTP modules; the released weights order the MTP concat as [embedding; hidden].
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import fp8
from deepseek_jax.config import ModelConfig
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.mla import MLA, AttentionMask, LatentCache
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.moe import MoE
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.layers.rope import rope_cos_sin

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    cfg: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask,
                 cache: LatentCache | None = None, positions: jax.Array | None = None):
        """h [batch, length, embed] -> (h, the layer's updated latent cache, or None without one)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        attn, cache = MLA(cfg, dtype, name="attn")(RMSNorm(cfg.rms_norm_eps, name="attn_norm")(h), cos, sin, mask,
                                                   cache, positions)
        h = h + attn
        if self.moe:
            ffn = MoE(cfg, dtype, name="mlp")
        else:
            ffn = MLP(cfg.intermediate_size, dtype, cfg.initializer_range, fp8.model_format(cfg), name="mlp")
        h = h + ffn(RMSNorm(cfg.rms_norm_eps, name="mlp_norm")(h))
        return nn.with_logical_constraint(h, ("batch", "length", None)), cache


def block_cls(cfg: ModelConfig) -> type[Block]:
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)


def block_stack(cfg: ModelConfig, moe: bool, count: int) -> nn.Module:
    """`count` blocks as one nn.scan: params and caches stacked on a leading `layers` axis (fully unrolled when
    count <= cfg.unroll_layers)."""
    return nn.scan(block_cls(cfg), variable_axes={"params": 0, "router_stats": 0, "routes": 0, "indexer_stats": 0},
                   split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast), length=count,
                   metadata_params={nn.PARTITION_NAME: "layers"},
                   unroll=count if count <= cfg.unroll_layers else 1)(cfg, moe)


class MTPModule(nn.Module):
    """V3 eq. 21-22: h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], then one block."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h: jax.Array, emb: jax.Array, cos: jax.Array, sin: jax.Array, mask: AttentionMask,
                 cache: LatentCache | None = None, positions: jax.Array | None = None):
        """-> (h^k, RMSNorm(h^k) for the shared head, the block's updated cache or None)."""
        cfg = self.cfg
        x = jnp.concatenate([RMSNorm(cfg.rms_norm_eps, name="enorm")(emb),
                             RMSNorm(cfg.rms_norm_eps, name="hnorm")(h)], axis=-1)
        x = Linear(cfg.hidden_size, (None, "embed"), dtype=jnp.dtype(cfg.dtype), init_std=cfg.initializer_range,
                   name="eh_proj")(x)
        h, cache = block_cls(cfg)(cfg, cfg.is_moe_layer(cfg.num_hidden_layers), name="block")(
            x, cos, sin, mask, cache, positions)
        return h, RMSNorm(cfg.rms_norm_eps, name="norm")(h), cache


def attention_mask(segment_ids: jax.Array) -> AttentionMask:
    """Causal and within-document (built per attention block, never as a [batch, 1, length, length] tensor)."""
    return AttentionMask.causal(segment_ids)


def cache_mask(positions: jax.Array, kv_len: int) -> AttentionMask:
    """Against a cache whose slot s holds position s: query t sees slots s <= its position, of the first kv_len."""
    return AttentionMask.over_cache(positions, kv_len)


class DeepSeekV3(nn.Module):
    """The main model and its MTP modules. `__call__` is the training forward; `decode`, `mtp_decode` and
    `head_logits` are the pieces of cached inference (deepseek_jax.infer)."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=jnp.float32,
                              embedding_init=nn.with_logical_partitioning(
                                  nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")))
        self.layers = [block_stack(cfg, moe, count) for moe, _, count in cfg.layer_segments]
        self.norm = RMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.head = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.dtype(cfg.dtype),
                               init_std=cfg.initializer_range)
        self.mtp = [MTPModule(cfg) for _ in range(cfg.num_nextn_predict_layers)]

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, mtp: bool = True,
                 head: bool = True) -> tuple[jax.Array, jax.Array | None]:
        """tokens [batch, length] -> logits [batch, length, vocab] float32 and MTP logits
        [mtp_depth, batch, length, vocab] (module k at position i predicts t_{i+k+1}), or None (also when
        mtp=False, which skips the MTP modules). head=False stops before the shared output head: the same
        outputs as normed hidden states [..., embed], for a loss that applies `head_logits` in pieces."""
        chex.assert_rank(tokens, 2)
        batch, length = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        chex.assert_equal_shape([tokens, positions, segment_ids])
        mask = attention_mask(segment_ids)
        cos, sin = rope_cos_sin(self.cfg, positions)

        h = self._embed(tokens)
        for stack in self.layers:
            h, _ = stack(h, cos, sin, mask, None, None)
        project = self.head_logits if head else (lambda x: x)
        logits = project(self.norm(h))

        mtp_logits = []
        for k, module in enumerate(self.mtp if mtp else ()):
            ahead = jnp.roll(tokens, -(k + 1), axis=1)  # t_{i+k+1}; wrapped tail positions are masked in the loss
            h, h_norm, _ = module(h, self._embed(ahead), cos, sin, mask)
            mtp_logits.append(project(h_norm))
        return logits, (jnp.stack(mtp_logits) if mtp_logits else None)

    def decode(self, tokens: jax.Array, positions: jax.Array, caches: tuple[LatentCache, ...],
               kv_len: int) -> tuple[jax.Array, tuple[LatentCache, ...]]:
        """New tokens [batch, length] at `positions` against the per-run latent caches (their first kv_len
        slots) -> last hidden states [batch, length, embed] (before the final norm) and the updated caches."""
        mask, (cos, sin) = cache_mask(positions, kv_len), rope_cos_sin(self.cfg, positions)
        h, new = self._embed(tokens), []
        for stack, cache in zip(self.layers, caches, strict=True):
            h, cache = stack(h, cos, sin, mask, cache, positions)
            new.append(cache)
        return h, tuple(new)

    def mtp_decode(self, k: int, h: jax.Array, ahead: jax.Array, positions: jax.Array, cache: LatentCache,
                   kv_len: int) -> tuple[jax.Array, jax.Array, LatentCache]:
        """MTP module k on h^{k-1} [batch, length, embed] and the tokens one further ahead [batch, length]
        -> (h^k, its normed form for head_logits, the module's updated cache)."""
        mask, (cos, sin) = cache_mask(positions, kv_len), rope_cos_sin(self.cfg, positions)
        return self.mtp[k](h, self._embed(ahead), cos, sin, mask, cache, positions)

    def final_logits(self, h: jax.Array) -> jax.Array:
        """The main model's head on last hidden states: float32 logits."""
        return self.head_logits(self.norm(h))

    def head_logits(self, x: jax.Array) -> jax.Array:
        """The output head shared by the main model and the MTP modules (compute dtype, float32 logits)."""
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(x.astype(jnp.float32))
        return self.head(x).astype(jnp.float32)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed(tokens).astype(self.cfg.dtype)


class ModelOutput(NamedTuple):
    logits: jax.Array  # [batch, length, vocab] float32 (head=False: normed hidden states [batch, length, embed])
    mtp_logits: jax.Array | None  # [mtp_depth, batch, length, vocab] float32 (head=False: [..., embed])
    router_stats: Any  # {"expert_load": [...], "balance_loss": [...]} nested like the MoE params
    indexer_stats: Any = None  # DSA: {"kl": [...], and in dense mode "mass": [...]} nested like the attention params


@functools.partial(jax.jit, static_argnums=0, static_argnames=("head", "indexer_loss"))
def forward(cfg: ModelConfig, params: Any, tokens: jax.Array, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, head: bool = True, indexer_loss: bool = False) -> ModelOutput:
    """Main logits, MTP logits and per-layer router statistics in one pass (jit-compiled per config);
    head=False returns the normed hidden states that `head_logits` maps to those logits. indexer_loss: also
    each DSA layer's indexer KL (and, with dense attention, the attention mass its top-k captures)."""
    mutable = ["router_stats"] + (["indexer_stats"] if indexer_loss and cfg.dsa else [])
    (logits, mtp), stats = DeepSeekV3(cfg).apply({"params": params}, tokens, positions, segment_ids, head=head,
                                                 mutable=mutable)
    return ModelOutput(logits, mtp, stats.get("router_stats", {}), stats.get("indexer_stats", {}))


def head_logits(cfg: ModelConfig, params: Any, x: jax.Array) -> jax.Array:
    """The shared output head on normed hidden states [..., embed] -> float32 logits [..., vocab]."""
    return DeepSeekV3(cfg).apply({"params": params}, x, method=DeepSeekV3.head_logits)


def init_params(cfg: ModelConfig, key: jax.Array) -> Any:
    """Random float32 params for DeepSeekV3(cfg) (normal, std initializer_range; norms at 1)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = jax.jit(DeepSeekV3(cfg).init)(key, tokens)
    return nn.meta.unbox(variables["params"])


def abstract_params(cfg: ModelConfig) -> Any:
    """Shapes and logical-axis metadata of the params, without allocating them."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(DeepSeekV3(cfg).init, jax.random.key(0), tokens)["params"]


def logits(cfg: ModelConfig, params: Any, tokens: jax.Array) -> jax.Array:
    """[batch, length] int32 -> [batch, length, vocab] float32 next-token logits of the main model."""
    return forward(cfg, params, tokens).logits
