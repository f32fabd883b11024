"""Training objective (V3 sec. 2.2, 2.1.2): L = L_main + lambda/D sum_k L_MTP^k + sum_layers L_bal.

Targets come from packed rows: position i predicts tokens[i + k] only when both sit in the same
document (segment id, 0 = padding), so no loss crosses a document boundary.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from deepseek_jax.sharding import length_shards, split_length


def shifted_targets(tokens: jax.Array, segment_ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """targets[i] = tokens[i + k]; mask[i] = same non-padding document. [batch, length] each."""
    length = tokens.shape[1]
    targets = jnp.roll(tokens, -k, axis=1)
    valid = (jnp.roll(segment_ids, -k, axis=1) == segment_ids) & (segment_ids != 0)
    return targets, valid & (jnp.arange(length) < length - k)


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over masked positions of -log softmax(logits)[target], in float32."""
    logits = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0))


def chunked_cross_entropy_sum(x: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array,
                              mask: jax.Array, chunk: int) -> jax.Array:
    """cross_entropy_sum(head(x), targets, mask) with x [batch, length, embed], computed over `chunk`-position
    slices of the length (a scan): each slice's [batch, chunk, vocab] logits are rematerialized in the backward
    pass, so the [batch, length, vocab] logits and their gradient never exist whole. chunk=0: one slice."""
    length = x.shape[1]
    if not chunk or chunk >= length // length_shards():
        return cross_entropy_sum(head(x), targets, mask)
    if (length // length_shards()) % chunk:
        raise ValueError(f"CE chunk {chunk} does not divide the sequence length {length} (per context shard); "
                         "pick a divisor")

    @jax.checkpoint
    def piece(total, xs):
        return total + cross_entropy_sum(head(xs[0]), xs[1], xs[2]), None

    # blocks of `chunk` positions of every context shard at once: rows and shards keep their sharding
    blocks = tuple(split_length(a, chunk) for a in (x, targets, mask))
    total, _ = jax.lax.scan(piece, jnp.zeros((), jnp.float32), blocks)
    return total


def _stat_leaves(stats: dict, name: str) -> list[jax.Array]:
    return [x for path, x in jax.tree_util.tree_flatten_with_path(stats or {})[0]
            if getattr(path[-1], "key", None) == name]


def sum_balance_loss(router_stats: dict) -> jax.Array:
    """Sum of every MoE layer's sequence-wise balance loss (already times alpha)."""
    return sum((jnp.sum(x) for x in _stat_leaves(router_stats, "balance_loss")), jnp.zeros((), jnp.float32))


def sum_indexer_loss(indexer_stats: dict) -> jax.Array:
    """L^I summed over the layers with an indexer (V3.2 sec. 2.1): each layer's mean per-query
    KL(p_main || softmax(I))."""
    return sum((jnp.sum(x) for x in _stat_leaves(indexer_stats, "kl")), jnp.zeros((), jnp.float32))


def mean_indexer_mass(indexer_stats: dict) -> jax.Array:
    """The share of the dense attention's mass on the indexer's top-k keys, averaged over layers (NaN if unknown)."""
    leaves = [jnp.ravel(x) for x in _stat_leaves(indexer_stats, "mass")]
    return jnp.mean(jnp.concatenate(leaves)) if leaves else jnp.full((), jnp.nan)
