"""AdamW with the DeepSeek-V3 schedule (V3 sec. 4.2): linear warmup, constant, cosine decay.

The auxiliary-loss-free routing bias is not a gradient parameter: the optimizer leaves it alone
(no update, no weight decay); `train.step` moves it by the bias-update rule instead. Weight
decay applies to matrices only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

BIAS = "e_score_correction_bias"


def lr_schedule(lr: float, steps: int, warmup_steps: int, decay_start: float, final_lr_ratio: float) -> optax.Schedule:
    """0 -> lr over warmup_steps, lr until decay_start * steps, then cosine to final_lr_ratio * lr at `steps`."""
    hold_until = max(int(decay_start * steps), warmup_steps)
    warmup = [optax.linear_schedule(0.0, lr, warmup_steps)] if warmup_steps else []
    return optax.join_schedules(
        [*warmup, optax.constant_schedule(lr), optax.cosine_decay_schedule(lr, max(steps - hold_until, 1),
                                                                           alpha=final_lr_ratio)],
        boundaries=[*([warmup_steps] if warmup_steps else []), hold_until])


def _labels(params: Any, trainable: Callable[[tuple], bool] | None = None) -> Any:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        k: "frozen" if k[-1] == BIAS or (trainable and not trainable(k)) else ("decay" if v.ndim >= 2 else "no_decay")
        for k, v in flat.items()})


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype: Any = jnp.float32) -> optax.GradientTransformation:
    """Adam's direction m_hat / (sqrt(v_hat) + eps) (Kingma & Ba, alg. 1), computed in float32 with both
    moments stored in `moment_dtype` (V3 sec. 3.3.3 keeps them in BF16)."""
    def init(params):
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, moment_dtype), params)
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=zeros, nu=zeros)

    def update(grads, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m.astype(jnp.float32) + (1 - b1) * g, state.mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v.astype(jnp.float32) + (1 - b2) * g * g, state.nu, grads)
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        direction = jax.tree_util.tree_map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        cast = functools.partial(jax.tree_util.tree_map, lambda x: x.astype(moment_dtype))
        return direction, optax.ScaleByAdamState(count=count, mu=cast(mu), nu=cast(nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(optim: Any, steps: int, trainable: Callable[[tuple], bool] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optim: lr, warmup_steps, decay_start, final_lr_ratio, b1, b2, eps, weight_decay, clip, moment_dtype.
    trainable(path of a param) -> False freezes that param (no update, no optimizer state)."""
    schedule = lr_schedule(optim.lr, steps, optim.warmup_steps, optim.decay_start, optim.final_lr_ratio)

    def adamw(wd: float) -> optax.GradientTransformation:
        return optax.chain(scale_by_adam(optim.b1, optim.b2, optim.eps, jnp.dtype(optim.moment_dtype)),
                           optax.add_decayed_weights(wd), optax.scale_by_learning_rate(schedule))

    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip),
        optax.multi_transform({"decay": adamw(optim.weight_decay), "no_decay": adamw(0.0),
                               "frozen": optax.set_to_zero()}, functools.partial(_labels, trainable=trainable)),
    )
    return tx, schedule

