"""GRPO rollouts: G completions per prompt from the compiled decode loop, their rule-based rewards, group
advantages, and the old-policy and reference log-probs in one jitted scoring pass.

A rollout batch holds P prompts x G samples, the G samples of a prompt adjacent. Each row is laid out as its
prompt followed by its completion, right-padded to a fixed width (max_prompt_tokens + max_new_tokens), so every
step compiles once. Position t of `mask` marks that token t+1 is a completion token: the loss and the log-probs
are over predicting completion tokens only. The scoring pass records the experts each token was routed to
(`routes`), which the update can replay (V3.2 "Keep Routing").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax.infer.decode as engine
from deepseek_jax.config import ModelConfig
from deepseek_jax.data.sft import encode_prompt
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.rl.grpo import group_advantages, informative_groups, overlong_penalty
from deepseek_jax.rl.tasks import Problem


class Rollout(NamedTuple):
    tokens: np.ndarray  # [batch, width] prompt then completion, right-padded
    mask: np.ndarray  # [batch, width - 1] float: 1 where the predicted token t+1 is a completion token
    rewards: np.ndarray  # [batch] the weighted sum of the reward components
    components: dict[str, np.ndarray]  # each reward [batch]
    advantages: np.ndarray  # [batch]
    completions: list[str]  # decoded, stop text included
    lengths: np.ndarray  # [batch] completion tokens (EOS / stop included)


def token_logprobs(cfg: ModelConfig, params: Any, tokens: jax.Array, routes: Any = None,
                   record: bool = False) -> tuple[jax.Array, jax.Array, Any]:
    """log pi(tokens[:, t+1] | tokens[:, :t+1]) and the entropy of that prediction, both [batch, length - 1]
    float32, from the main model (no MTP). routes: a recorded `routes` collection to replay; record=True
    returns the routes this pass chose (else None)."""
    variables = {"params": params} | ({"routes": routes} if routes is not None else {})
    model = DeepSeekV3(cfg)
    if record:
        (logits, _), recorded = model.apply(variables, tokens, mtp=False, mutable=["routes"])
        routes = recorded.get("routes")
    else:
        logits, _ = model.apply(variables, tokens, mtp=False)
        routes = None
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return target, entropy, routes


def score(cfg: ModelConfig, params: Any, ref_params: Any, tokens: jax.Array, replay: bool) -> dict[str, Any]:
    """The scoring pass: old-policy log-probs (recording routes when `replay`), entropy, reference log-probs."""
    old, entropy, routes = token_logprobs(cfg, params, tokens, record=replay)
    ref = token_logprobs(cfg, ref_params, tokens)[0] if ref_params is not None else jnp.zeros_like(old)
    return {"old_logprobs": old, "ref_logprobs": ref, "entropy": entropy, "routes": routes}


def layout(prompts: Sequence[Sequence[int]], completions: np.ndarray, n_generated: np.ndarray,
           width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of prompt + completion, right-padded to `width`, and the completion-target mask [batch, width-1]."""
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width - 1), np.float32)
    for row, (prompt, n) in enumerate(zip(prompts, n_generated, strict=True)):
        p = len(prompt)
        tokens[row, :p] = prompt
        tokens[row, p:p + n] = completions[row, :n]
        mask[row, p - 1:p + n - 1] = 1.0
    return tokens, mask


def sample(cfg: ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[str], *, max_prompt_tokens: int,
           max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, key: jax.Array | None = None,
           stop: Sequence[str] = (), chat: bool = False) -> tuple[list[list[int]], Any, list[str]]:
    """Complete each prompt once in one batch: (prompt ids, the engine's Completion, completion texts without
    EOS). A completion ends at EOS or after the first stop string."""
    ids = [encode_prompt(tokenizer, p, max_prompt_tokens, chat) for p in prompts]
    pad = max(tokenizer.pad_id, 0)
    batch = np.full((len(ids), max_prompt_tokens), pad, np.int32)
    for row, x in enumerate(ids):
        batch[row, :len(x)] = x
    eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
    out = engine.complete(cfg, params, batch, max_new_tokens, temperature, top_p, key, lengths=[len(x) for x in ids],
                          eos_id=eos, stop=[encode_stop(tokenizer, s) for s in stop], pad_id=pad)
    counts = [cut_at_stop(tokenizer, out.completions[r, :n], stop) for r, n in enumerate(out.num_generated)]
    out = out._replace(num_generated=np.asarray(counts, np.int32))
    texts = [tokenizer.decode([t for t in out.completions[r, :n] if t != eos]) for r, n in enumerate(counts)]
    return ids, out, texts


def encode_stop(tokenizer: Any, text: str) -> list[int]:
    """A stop string as token ids (the decode loop stops on them; `cut_at_stop` catches other tokenizations)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"stop string {text!r} encodes to no tokens")
    return ids


def cut_at_stop(tokenizer: Any, ids: np.ndarray, stop: Sequence[str]) -> int:
    """The number of tokens up to the first whose text completes a stop string (all of them if none does): a
    stop string may be tokenized differently inside text than on its own."""
    if not stop or not any(s in tokenizer.decode(ids) for s in stop):
        return len(ids)
    return next(n for n in range(1, len(ids) + 1) if any(s in tokenizer.decode(ids[:n]) for s in stop))


def collect(cfg: ModelConfig, params: Any, tokenizer: Any, task: Any, problems: Sequence[Problem], *,
            group_size: int, max_prompt_tokens: int, max_new_tokens: int, temperature: float, top_p: float,
            key: jax.Array, reward_weights: dict[str, float], stop: Sequence[str] = (),
            chat: bool = False, overlong_buffer: int = 0) -> Rollout:
    """Sample `group_size` completions of each problem (through the compiled decode loop), score them with the
    task's rewards and standardize the rewards within each group. overlong_buffer > 0 adds DAPO's soft overlong
    punishment (grpo.overlong_penalty, component "overlong") to the reward."""
    prompts, out, texts = sample(cfg, params, tokenizer, [p.prompt for p in problems for _ in range(group_size)],
                                 max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, key=key, stop=stop, chat=chat)
    scores = [task.score(problems[r // group_size], text) for r, text in enumerate(texts)]
    components = {name: np.asarray([s[name] for s in scores], np.float32) for name in scores[0]}
    rewards = sum(reward_weights.get(name, 0.0) * v for name, v in components.items())
    if overlong_buffer:
        components["overlong"] = overlong_penalty(out.num_generated, max_new_tokens, overlong_buffer)
        rewards = rewards + components["overlong"]
    tokens, mask = layout(prompts, out.completions, out.num_generated, max_prompt_tokens + max_new_tokens,
                          max(tokenizer.pad_id, 0))
    advantages = np.asarray(group_advantages(jnp.asarray(rewards), group_size))
    return Rollout(tokens, mask, np.asarray(rewards, np.float32), components, advantages, texts,
                   np.asarray(out.num_generated))


def keep_informative(rollouts: Sequence[Rollout], group_size: int, n_groups: int) -> tuple[Rollout, np.ndarray]:
    """Dynamic sampling's batch: the first `n_groups` groups with reward spread across `rollouts` (in order), topped
    up with the first uninformative ones when too few have any (they add no policy gradient). Returns the batch
    and the indices of its groups among all the rollouts' groups."""
    informative = np.concatenate([informative_groups(r.rewards, group_size) for r in rollouts])
    order = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])[:n_groups]
    rows = (order[:, None] * group_size + np.arange(group_size)).reshape(-1)
    def cat(get):
        return np.concatenate([get(r) for r in rollouts])[rows]
    texts = [t for r in rollouts for t in r.completions]
    batch = Rollout(cat(lambda r: r.tokens), cat(lambda r: r.mask), cat(lambda r: r.rewards),
                    {k: cat(lambda r, k=k: r.components[k]) for k in rollouts[0].components},
                    cat(lambda r: r.advantages), [texts[i] for i in rows], cat(lambda r: r.lengths))
    return batch, order
