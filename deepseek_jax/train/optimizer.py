"""AdamW with the DeepSeek-V3 schedule (V3 sec. 4.2): linear warmup, constant, cosine decay.

The auxiliary-loss-free routing bias is not a gradient parameter: the optimizer leaves it alone
(no update, no weight decay); `train.step` moves it by the bias-update rule instead. Weight
decay applies to matrices only.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax
from flax import traverse_util

BIAS = "e_score_correction_bias"


def lr_schedule(lr: float, steps: int, warmup_steps: int, decay_start: float, final_lr_ratio: float) -> optax.Schedule:
    """0 -> lr over warmup_steps, lr until decay_start * steps, then cosine to final_lr_ratio * lr at `steps`."""
    hold_until = max(int(decay_start * steps), warmup_steps)
    return optax.join_schedules([
        optax.linear_schedule(0.0, lr, max(warmup_steps, 1)),
        optax.constant_schedule(lr),
        optax.cosine_decay_schedule(lr, max(steps - hold_until, 1), alpha=final_lr_ratio),
    ], boundaries=[max(warmup_steps, 1), hold_until])


def _labels(params: Any) -> Any:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        k: "frozen" if k[-1] == BIAS else ("decay" if v.ndim >= 2 else "no_decay") for k, v in flat.items()})


def make_optimizer(optim: Any, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optim: lr, warmup_steps, decay_start, final_lr_ratio, b1, b2, eps, weight_decay, clip, mu_dtype."""
    schedule = lr_schedule(optim.lr, steps, optim.warmup_steps, optim.decay_start, optim.final_lr_ratio)

    def adamw(wd: float) -> optax.GradientTransformation:
        return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=wd,
                           mu_dtype=jnp.dtype(optim.mu_dtype))

    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip),
        optax.multi_transform({"decay": adamw(optim.weight_decay), "no_decay": adamw(0.0),
                               "frozen": optax.set_to_zero()}, _labels),
    )
    return tx, schedule

