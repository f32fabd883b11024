"""Training objective (V3 sec. 2.2, 2.1.2): L = L_main + lambda/D sum_k L_MTP^k + sum_layers L_bal.

Targets come from packed rows: position i predicts tokens[i + k] only when both sit in the same
document (segment id, 0 = padding), so no loss crosses a document boundary.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


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
    batch, length, _ = x.shape
    if not chunk or chunk >= length:
        return cross_entropy_sum(head(x), targets, mask)
    if length % chunk:
        raise ValueError(f"CE chunk {chunk} does not divide the sequence length {length}; pick a divisor")

    def slices(a):  # [batch, length, ...] -> [length // chunk, batch, chunk, ...]; rows keep their sharding
        return jnp.moveaxis(a.reshape(batch, length // chunk, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def piece(total, xs):
        return total + cross_entropy_sum(head(xs[0]), xs[1], xs[2]), None

    total, _ = jax.lax.scan(piece, jnp.zeros((), jnp.float32), (slices(x), slices(targets), slices(mask)))
    return total


def sum_balance_loss(router_stats: dict) -> jax.Array:
    """Sum of every MoE layer's sequence-wise balance loss (already times alpha)."""
    leaves = [x for path, x in jax.tree_util.tree_flatten_with_path(router_stats)[0]
              if getattr(path[-1], "key", None) == "balance_loss"]
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))
