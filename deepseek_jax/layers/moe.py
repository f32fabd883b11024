"""DeepSeekMoE (V3 sec. 2.1.2): shared experts plus fine-grained routed experts, dropless.

Routing (V3 eq. 12-16, `noaux_tc`): s = sigmoid(u W) in float32; experts are chosen by s + b,
where b is the auxiliary-loss-free correction bias (not a gradient parameter, V3 eq. 16), within
the topk_group groups with the best top-2 sums; gate weights use the unbiased s, normalised to
sum 1 (norm_topk_prob), times routed_scaling_factor. V2 scores with softmax and selects greedily,
or group-limited by each group's max score.

Per layer the router sows into the `router_stats` collection:
  expert_load  [experts]  tokens routed to each expert over the batch (drives the bias update),
  balance_loss []         sequence-wise balance loss alpha * sum_i f_i P_i (V3 eq. 17-20);
and records its choices as `routes/idx` [batch, length, top_k] when that collection is mutable. Given a
`routes` collection as input, it replays those experts instead of choosing (V3.2's "Keep Routing" for RL:
the policy ratio then compares the same expert paths); the gate weights still come from the current scores.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.backend import resolve
from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8 import model_format, stored_scales, stored_weight
from deepseek_jax.layers.ep import combine, expert_axis_size, expert_parallel, sort_by_expert
from deepseek_jax.layers.gmm import fp8_grouped_matmul, grouped_matmul
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.mlp import MLP


def _overwrite(_, new):
    return new


def choose(cfg: ModelConfig, scores: jax.Array, bias: jax.Array | None) -> jax.Array:
    """scores [tokens, experts] (sigmoid or softmax) -> the chosen expert ids [tokens, top_k] (V3 eq. 13, 16)."""
    choice = scores if bias is None else scores + bias
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        grouped = choice.reshape(*choice.shape[:-1], cfg.n_group, -1)
        if cfg.topk_method == "noaux_tc":
            group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
        else:
            group_score = grouped.max(-1)
        kept = jax.lax.top_k(group_score, cfg.topk_group)[1]
        group_mask = jnp.zeros(group_score.shape, bool).at[
            jnp.arange(group_score.shape[0])[:, None], kept].set(True)
        choice = jnp.where(group_mask[..., None], grouped, -jnp.inf).reshape(choice.shape)
    return jax.lax.top_k(jax.lax.stop_gradient(choice), cfg.num_experts_per_tok)[1]


def gate_weights(cfg: ModelConfig, scores: jax.Array, idx: jax.Array) -> jax.Array:
    """The unbiased scores of the chosen experts, normalised if norm_topk_prob, times routed_scaling_factor."""
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor


def route(cfg: ModelConfig, scores: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """scores [tokens, experts] (sigmoid or softmax) -> gate weights, expert ids [tokens, top_k]."""
    idx = choose(cfg, scores, bias)
    return gate_weights(cfg, scores, idx), idx


class Router(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [batch, length, embed] -> weights float32, ids int32, both [batch, length, top_k]."""
        cfg = self.cfg
        batch, length, _ = x.shape
        n_exp, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        logits = Linear(n_exp, ("embed", None), dtype=jnp.float32, init_std=cfg.initializer_range,
                        name="gate")(x.astype(jnp.float32))
        scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, -1)
        bias = None
        if cfg.topk_method == "noaux_tc":
            bias = jax.lax.stop_gradient(self.param(
                "e_score_correction_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                (n_exp,), jnp.float32))
        scores_flat = scores.reshape(-1, n_exp)
        if self.has_variable("routes", "idx"):  # replay recorded routes (V3.2 "Keep Routing")
            idx = self.get_variable("routes", "idx").reshape(-1, k)
        else:
            idx = choose(cfg, scores_flat, bias)
        weights = gate_weights(cfg, scores_flat, idx).reshape(batch, length, k)
        idx = idx.reshape(batch, length, k)
        self.sow("routes", "idx", idx, reduce_fn=_overwrite)  # recorded when "routes" is mutable

        counts = jnp.zeros((batch, n_exp), jnp.float32).at[jnp.arange(batch)[:, None], idx.reshape(batch, -1)].add(1.0)
        f = counts * n_exp / (k * length)  # V3 eq. 18
        p = jnp.mean(scores / scores.sum(-1, keepdims=True), axis=1)  # V3 eq. 19-20
        balance = cfg.aux_loss_alpha * jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, -1))
        self.sow("router_stats", "expert_load", counts.sum(0), reduce_fn=_overwrite)
        self.sow("router_stats", "balance_loss", balance, reduce_fn=_overwrite)
        return weights, idx


class Experts(nn.Module):
    """Routed SwiGLU experts, run as grouped matmuls over tokens sorted by expert (no dropping); in FP8 with
    cfg.fp8, per-expert 128x128 weight blocks (an FP8 checkpoint's own codes and scales where kept)."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, weights: jax.Array, idx: jax.Array) -> jax.Array:
        """x [batch, length, embed], weights/idx [batch, length, top_k] -> [batch, length, embed]."""
        cfg = self.cfg
        n_exp, d, f = cfg.n_routed_experts, x.shape[-1], cfg.moe_intermediate_size
        init = nn.initializers.normal(cfg.initializer_range)
        w_in = ("experts", "embed", "mlp")
        gate = self.param("gate", nn.with_logical_partitioning(init, w_in), (n_exp, d, f), jnp.float32)
        up = self.param("up", nn.with_logical_partitioning(init, w_in), (n_exp, d, f), jnp.float32)
        down = self.param("down", nn.with_logical_partitioning(init, ("experts", "mlp", "embed")),
                          (n_exp, f, d), jnp.float32)
        names, fp8 = ("gate", "up", "down"), model_format(cfg)
        if fp8:  # the weights as they are, plus the block scales of E4M3 codes kept from a checkpoint
            params = (gate, up, down, *(s for s in map(functools.partial(stored_scales, self), names) if s is not None))
        else:
            params = tuple(stored_weight(self, k, w, lead=1) for k, w in zip(names, (gate, up, down), strict=True))

        ffn = functools.partial(expert_ffn, dtype=self.dtype, impl=cfg.moe_impl, fp8=fp8)
        if expert_axis_size() > 1:
            ragged = resolve("moe_impl", cfg.moe_impl) == "ragged"
            return expert_parallel(ffn, x, weights, idx, params, ragged=ragged, chunk=cfg.moe_chunk_tokens)
        flat_x, weights, idx = (a.reshape(-1, a.shape[-1]) for a in (x, weights, idx))
        order, expert, token = sort_by_expert(idx)
        ys = ffn(flat_x[token], jnp.bincount(expert, length=n_exp).astype(jnp.int32), *params)
        return combine(ys, weights, order, token, flat_x).reshape(x.shape)


def expert_ffn(xs: jax.Array, sizes: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
               *scales: jax.Array, dtype: jnp.dtype, impl: str, fp8: str | None = None) -> jax.Array:
    """SwiGLU of each expert on its rows: xs [rows, embed] sorted by expert, sizes [experts].

    fp8: a scale format runs the three grouped matmuls in FP8; `scales` (gate, up, down) [experts, in/128,
    out/128] then mark the weights as E4M3 codes of a checkpoint."""
    def gmm(a, w, scale=None):
        if fp8:
            return fp8_grouped_matmul(a, w, sizes, scale, scale_fmt=fp8, impl=impl)
        return grouped_matmul(a, w.astype(dtype), sizes, impl=impl)

    s_gate, s_up, s_down = scales or (None, None, None)
    xs = xs.astype(dtype)
    return gmm(nn.silu(gmm(xs, gate, s_gate)) * gmm(xs, up, s_up), down, s_down)


class MoE(nn.Module):
    """h' = sum_i FFN_shared_i(u) + sum_i g_i FFN_routed_i(u)  (V3 eq. 12)."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        weights, idx = Router(cfg, name="router")(x)
        y = Experts(cfg, self.dtype, name="experts")(x, weights, idx)
        if cfg.n_shared_experts:
            y = y + MLP(cfg.n_shared_experts * cfg.moe_intermediate_size, self.dtype, cfg.initializer_range,
                        model_format(cfg), name="shared")(x)
        return y
