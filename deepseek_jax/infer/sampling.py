"""Token sampling: greedy at temperature 0; else temperature, then top-k, then top-p (nucleus).

Speculative sampling (Leviathan et al. 2023): a draft x ~ q is accepted with probability
min(1, p(x) / q(x)); at the first rejection the token is drawn from norm(max(0, p - q)), and when
every draft is accepted a bonus token is drawn from the next p. The tokens are then distributed
exactly as if sampled from p one at a time. Greedy decoding is the same rule with one-hot p and q.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is chosen from logits; hashable, so it is static under jit."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling {self}: need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [..., vocab] -> the float32 distribution tokens are drawn from (one-hot argmax when greedy)."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    probs = jax.nn.softmax(logits, -1)
    return _nucleus(probs, sampling.top_p) if sampling.top_p < 1.0 else probs


def _nucleus(probs: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Keep the smallest prefix of the sorted tokens whose mass reaches top_p (broadcast over probs[..., :1])."""
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, -1)
    keep_sorted = jnp.cumsum(sorted_probs, -1) - sorted_probs < top_p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), -1)
    probs = jnp.where(keep, probs, 0.0)
    return probs / probs.sum(-1, keepdims=True)


def row_probabilities(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`probabilities` with each row's own settings, as traced values (one compiled program serves every mix of
    requests): logits [batch, ..., vocab]; temperature, top_k, top_p [batch]."""
    logits = logits.astype(jnp.float32)
    each = (-1,) + (1,) * (logits.ndim - 1)
    t, k, p = temperature.reshape(each), top_k.reshape(each), top_p.reshape(each)
    scaled = logits / jnp.where(t > 0, t, 1.0)
    ranked = -jnp.sort(-scaled, axis=-1)
    kth = jnp.take_along_axis(ranked, jnp.clip(k - 1, 0, logits.shape[-1] - 1), -1)
    scaled = jnp.where((k > 0) & (scaled < kth), -jnp.inf, scaled)
    probs = jax.nn.softmax(scaled, -1)
    probs = jnp.where(p < 1.0, _nucleus(probs, p), probs)
    greedy = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(t > 0, probs, greedy)


def draw(probs: jax.Array, key: jax.Array, greedy: bool = False) -> jax.Array:
    """One token per row of probs [..., vocab] -> int32 [...] (greedy: the argmax of the one-hot, no randomness)."""
    if greedy:
        return jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def speculative_accept(p: jax.Array, q: jax.Array, drafts: jax.Array, key: jax.Array,
                       greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """p [batch, D+1, vocab]: target distributions at the D drafts and after them; q [batch, D, vocab]: the draft
    distributions; drafts [batch, D]. Returns (accepted [batch]: the length of the accepted prefix, next [batch]:
    the corrected token after it, or the bonus token when all D were accepted). D = 0 is plain sampling.
    greedy=True (one-hot p and q) takes the rule's deterministic shortcut: accept while the draft is p's argmax."""
    batch, depth = drafts.shape
    rows = jnp.arange(batch)
    if greedy:
        target = jnp.argmax(p, axis=-1).astype(jnp.int32)  # [batch, D+1]
        accepted = jnp.sum(jnp.cumprod(drafts == target[:, :depth], axis=-1), axis=-1).astype(jnp.int32)
        return accepted, target[rows, accepted]
    k_accept, k_next = jax.random.split(key)
    p_draft = jnp.take_along_axis(p[:, :depth], drafts[..., None], -1)[..., 0]
    q_draft = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
    ok = jax.random.uniform(k_accept, (batch, depth)) * q_draft < p_draft  # u < p/q, without dividing by 0
    accepted = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1).astype(jnp.int32)
    q_next = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)[rows, accepted]  # q = 0 after the last draft
    p_next = p[rows, accepted]
    residual = jnp.maximum(p_next - q_next, 0.0)
    mass = residual.sum(-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_next)
    return accepted, draw(residual, k_next)
