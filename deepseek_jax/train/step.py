"""One optimizer step: gradient accumulation over micro-batches, AdamW, then the bias update.

Bias update (V3 sec. 2.1.2, auxiliary-loss-free balancing): after each step, with c_i the tokens
routed to expert i over the whole batch and c_mean their mean, b_i <- b_i + gamma * sign(c_mean - c_i).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh

from deepseek_jax import sharding
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import abstract_params, forward
from deepseek_jax.train.losses import cross_entropy_sum, shifted_targets, sum_balance_loss
from deepseek_jax.train.optimizer import BIAS


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their shardings: params by the rules table,
    optimizer moments like their params, everything else replicated. Allocates nothing (call it outside
    a mesh context); a mesh that
    does not divide the model is a MeshError naming the param, dimension and axis."""
    boxed = abstract_params(cfg)
    sharding.check_divisible(boxed, mesh)
    param_sh = sharding.logical_shardings(mesh, boxed)
    params = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    nn.meta.unbox(boxed), param_sh)
    replicated = sharding.replicated(mesh)
    by_path = {_keys(path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}

    def like_param(path, x):  # optimizer leaves sit under their param's key path (e.g. mu/layers_1/...)
        keys = _keys(path)
        match = next((by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in by_path), None)
        sh = match.sharding if match is not None and match.shape == x.shape else replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    opt_state = jax.tree_util.tree_map_with_path(like_param, jax.eval_shape(tx.init, params))
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                      opt_state=opt_state)


def _keys(path: tuple) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def shardings_of(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def loss_terms(cfg: ModelConfig, params: Any, batch: dict, mtp_lambda: float, n_tokens: jax.Array,
               weight: float = 1.0) -> tuple[jax.Array, dict]:
    """One micro-batch's share of the loss. CE is summed and divided by the whole batch's target count;
    the MTP and balance terms are micro-batch means times `weight` (1 / micro-batches), so shares add up."""
    out = forward(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    targets, mask = batch_targets(batch, 1)
    ce = cross_entropy_sum(out.logits, targets, mask) / n_tokens
    mtp = jnp.zeros((), jnp.float32)
    depth = cfg.num_nextn_predict_layers
    for k in range(depth):  # module k predicts t_{i+k+2}
        targets, mask_k = batch_targets(batch, k + 2)
        mtp += cross_entropy_sum(out.mtp_logits[k], targets, mask_k) / jnp.maximum(mask_k.sum(), 1) / depth
    mtp, balance = mtp * weight, sum_balance_loss(out.router_stats) * weight
    aux = {"ce": ce, "mtp_loss": mtp, "balance_loss": balance, "loads": expert_loads(out.router_stats)}
    return ce + mtp_lambda * mtp + balance, aux


def batch_targets(batch: dict, k: int) -> tuple[jax.Array, jax.Array]:
    """Targets k ahead and their mask; with a `target_mask` (SFT) only marked tokens are predicted."""
    targets, mask = shifted_targets(batch["tokens"], batch["segment_ids"], k)
    if "target_mask" in batch:
        mask &= jnp.roll(batch["target_mask"], -k, axis=1) > 0
    return targets, mask


def expert_loads(router_stats: Any) -> dict[tuple, jax.Array]:
    """{path of the router: expert_load [..., experts]} from the sown statistics."""
    flat = traverse_util.flatten_dict(router_stats)
    return {k[:-1]: v for k, v in flat.items() if k[-1] == "expert_load"}


def update_bias(params: Any, loads: dict[tuple, jax.Array], gamma: float) -> Any:
    """b_i += gamma * sign(mean_j c_j - c_i) for every MoE layer (stacked layers handled alike)."""
    flat = traverse_util.flatten_dict(params)
    for path, load in loads.items():
        key = (*path, BIAS)
        if key in flat:
            flat[key] = flat[key] + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)
    return traverse_util.unflatten_dict(flat)


def load_imbalance(loads: dict[tuple, jax.Array]) -> jax.Array:
    """max_i c_i / mean_i c_i, averaged over MoE layers (1.0 = perfectly balanced)."""
    ratios = [jnp.ravel(x.max(-1) / jnp.maximum(x.mean(-1), 1e-9)) for x in loads.values()]
    return jnp.mean(jnp.concatenate(ratios)) if ratios else jnp.ones(())


def train_step(state: TrainState, batch: dict, *, cfg: ModelConfig, tx: optax.GradientTransformation,
               schedule: optax.Schedule, mtp_lambda: float, bias_update_speed: float, grad_accum: int = 1):
    """batch: tokens, positions, segment_ids, each [batch, length]. Returns (new state, metrics)."""
    _, mask = batch_targets(batch, 1)
    n_tokens = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    micro = jax.tree_util.tree_map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

    def grads_of(mb):
        (_, aux), grads = jax.value_and_grad(loss_terms, argnums=1, has_aux=True)(
            cfg, state.params, mb, mtp_lambda, n_tokens, 1.0 / grad_accum)
        return grads, aux

    if grad_accum == 1:
        grads, aux = grads_of(batch)
    else:
        def accumulate(carry, mb):
            return jax.tree_util.tree_map(jnp.add, carry, grads_of(mb)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(grads_of, batch))
        (grads, aux), _ = jax.lax.scan(accumulate, zeros, micro)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if cfg.topk_method == "noaux_tc" and bias_update_speed:
        params = update_bias(params, aux["loads"], bias_update_speed)
    metrics = {
        "loss": aux["ce"] + mtp_lambda * aux["mtp_loss"] + aux["balance_loss"],
        "ce": aux["ce"], "mtp_loss": aux["mtp_loss"], "balance_loss": aux["balance_loss"],
        "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
        "expert_load_max_mean": load_imbalance(aux["loads"]), "tokens": n_tokens,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict, *, cfg: ModelConfig) -> dict[str, jax.Array]:
    """Summed next-token CE and target count, to be pooled over eval batches."""
    out = forward(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    targets, mask = batch_targets(batch, 1)
    return {"ce_sum": cross_entropy_sum(out.logits, targets, mask), "count": mask.sum().astype(jnp.float32)}
