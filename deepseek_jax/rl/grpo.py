"""GRPO objective (DeepSeekMath, arXiv 2402.03300, eq. 3-4): group-relative advantages and the clipped loss; and
DAPO's (arXiv 2503.14476) additions for sparse rewards: clip-higher, dynamic sampling, soft overlong punishment.

Shapes: rewards [batch]; logprobs, old_logprobs, ref_logprobs, mask [batch, length] (mask 1 on completion
tokens, 0 on padding); advantages [batch]. The G samples of one prompt are adjacent in the batch.
The loss aggregations follow TRL's GRPOTrainer (checked against it in tests/test_grpo.py::test_matches_trl).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """Outcome supervision (sec. 4.1.2): A_i = (r_i - mean(r_group)) / (std(r_group, ddof=1) + 1e-4). [N] -> [N]."""
    rewards = jnp.asarray(rewards)
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        rewards = rewards.astype(jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [n_groups * group_size], got shape {rewards.shape}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (the group std needs two samples), got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards are not a whole number of groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = groups.std(axis=1, ddof=1, keepdims=True)
    return ((groups - mean) / (std + ADVANTAGE_EPS)).reshape(-1)


def informative_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """DAPO's dynamic sampling filter (eq. 11): a group whose G rewards are all equal has zero advantage and no
    gradient; True for each group [n_groups] that has some spread."""
    groups = np.asarray(rewards).reshape(-1, group_size)
    return groups.max(axis=1) > groups.min(axis=1)


def overlong_penalty(lengths: np.ndarray, max_length: int, buffer: int) -> np.ndarray:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_length - buffer tokens, then falling linearly to -1 at
    max_length (and -1 past it): ((max_length - buffer) - |y|) / buffer inside the buffer."""
    lengths = np.asarray(lengths, np.float64)
    return np.clip(((max_length - buffer) - lengths) / buffer, -1.0, 0.0).astype(np.float32)


def _grpo(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    """Eq. 3: 1/G sum_i 1/|o_i| sum_t. Like TRL, a sequence without tokens adds 0 but still counts in 1/G."""
    return jnp.mean(jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))


def _bnpo(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    """Every completion token of the batch weighs the same: sum / number of masked tokens."""
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _dr_grpo(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    """Dr. GRPO (arXiv 2503.20783): sum / (batch * max completion length), no length normalisation."""
    return jnp.sum(per_token * mask) / mask.size


LOSS_AGGREGATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "grpo": _grpo,
    "bnpo": _bnpo,
    "dr_grpo": _dr_grpo,
}


def grpo_loss(logprobs: jax.Array, old_logprobs: jax.Array, ref_logprobs: jax.Array | None, advantages: jax.Array,
              mask: jax.Array, epsilon: float = 0.2, beta: float = 0.04, loss_type: str = "grpo",
              epsilon_high: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Negative of the GRPO objective J (eq. 3) with the k3 KL estimator of eq. 4; returns (loss, metrics).

    Per token: ratio = exp(logprobs - old_logprobs), surrogate = min(ratio A, clip(ratio, 1-eps, 1+eps_high) A)
    (eps_high = epsilon unless given: DAPO's clip-higher, eq. 10, lets unlikely tokens of good samples grow),
    KL = exp(ref - logprobs) - (ref - logprobs) - 1, loss_t = -(surrogate - beta KL); `loss_type` names the
    aggregation over tokens (LOSS_AGGREGATIONS). beta must be a Python number: at 0 the KL term, and the
    reference model, are skipped (ref_logprobs may be None). Values at padding positions are ignored.
    """
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss_type {loss_type!r}; registered: {sorted(LOSS_AGGREGATIONS)}")
    if beta != 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta != 0")
    valid = jnp.asarray(mask) > 0
    mask = valid.astype(logprobs.dtype)
    # Padding values never reach the loss, nor its gradient (an inf there would give 0 * inf = nan).
    logprobs, old_logprobs = jnp.where(valid, logprobs, 0.0), jnp.where(valid, old_logprobs, 0.0)
    adv = jnp.asarray(advantages, logprobs.dtype)[:, None]

    high = epsilon if epsilon_high is None else epsilon_high
    ratio = jnp.exp(logprobs - old_logprobs)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - epsilon, 1.0 + high) * adv)
    per_token = -surrogate
    n_tokens = jnp.maximum(jnp.sum(mask), 1.0)
    kl = jnp.zeros((), logprobs.dtype)
    if beta != 0:
        log_ref_ratio = jnp.where(valid, ref_logprobs, 0.0) - logprobs
        per_token_kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
        per_token = per_token + beta * per_token_kl
        kl = jnp.sum(per_token_kl * mask) / n_tokens
    loss = LOSS_AGGREGATIONS[loss_type](per_token, mask)

    clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
    any_token = jnp.any(valid)
    metrics = {
        "clip_fraction": jnp.sum(clipped * mask) / n_tokens,
        "kl": kl,
        "ratio": jnp.sum(ratio * mask) / n_tokens,
        "ratio_min": jnp.where(any_token, jnp.min(jnp.where(valid, ratio, jnp.inf)), 1.0),
        "ratio_max": jnp.where(any_token, jnp.max(jnp.where(valid, ratio, -jnp.inf)), 1.0),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
