"""Training objective (V3 sec. 2.2, 2.1.2): L = L_main + lambda/D sum_k L_MTP^k + sum_layers L_bal.

Targets come from packed rows: position i predicts tokens[i + k] only when both sit in the same
document (segment id, 0 = padding), so no loss crosses a document boundary.
"""

from __future__ import annotations

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


def sum_balance_loss(router_stats: dict) -> jax.Array:
    """Sum of every MoE layer's sequence-wise balance loss (already times alpha)."""
    leaves = [x for path, x in jax.tree_util.tree_flatten_with_path(router_stats)[0]
              if getattr(path[-1], "key", None) == "balance_loss"]
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))
