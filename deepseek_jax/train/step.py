"""One optimizer step: gradient accumulation over micro-batches, AdamW, then the bias update.

Bias update (V3 sec. 2.1.2, auxiliary-loss-free balancing): after each step, with c_i the tokens
routed to expert i over the whole batch and c_mean their mean, b_i <- b_i + gamma * sign(c_mean - c_i).

DSA stages (V3.2 sec. 2.1): "dsa_warmup" freezes the main model and keeps attention dense; only the indexer
trains, on L^I = KL(p_main || softmax(I)). "dsa_sparse" attends to the selected keys; the indexer (its inputs
detached) trains on L^I over them, everything else on the LM loss.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util
from jax.sharding import Mesh

from deepseek_jax import sharding
from deepseek_jax.config import ConfigError, ModelConfig
from deepseek_jax.model import abstract_params, forward, head_logits
from deepseek_jax.train.losses import (
    chunked_cross_entropy_sum,
    cross_entropy_sum,
    mean_indexer_mass,
    shifted_targets,
    sum_balance_loss,
    sum_indexer_loss,
)
from deepseek_jax.train.optimizer import BIAS


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                   offload: bool = False) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their shardings: params by the rules table,
    optimizer moments like their params, everything else replicated; with `offload`, the optimizer state
    in pinned host memory. Allocates nothing (call it outside a mesh context); a mesh that
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
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh.with_memory_kind("pinned_host") if offload else sh)

    opt_state = jax.tree_util.tree_map_with_path(like_param, jax.eval_shape(tx.init, params))
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                      opt_state=opt_state)


def _keys(path: tuple) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def shardings_of(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def loss_terms(cfg: ModelConfig, params: Any, batch: dict, mtp_lambda: float, n_tokens: jax.Array,
               weight: float = 1.0, ce_chunk: int = 0) -> tuple[jax.Array, dict]:
    """One micro-batch's share of the loss. CE is summed and divided by the whole batch's target count;
    the MTP and balance terms are micro-batch means times `weight` (1 / micro-batches), so shares add up.
    The shared head runs inside the CE, `ce_chunk` positions at a time (0: all at once)."""
    out = forward(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"], head=False,
                  indexer_loss=cfg.dsa)
    ce_sum = functools.partial(chunked_cross_entropy_sum, head=functools.partial(head_logits, cfg, params),
                               chunk=ce_chunk)
    targets, mask = batch_targets(batch, 1)
    ce = ce_sum(out.logits, targets=targets, mask=mask) / n_tokens
    mtp = jnp.zeros((), jnp.float32)
    depth = cfg.num_nextn_predict_layers
    for k in range(depth):  # module k predicts t_{i+k+2}
        targets, mask_k = batch_targets(batch, k + 2)
        mtp += ce_sum(out.mtp_logits[k], targets=targets, mask=mask_k) / jnp.maximum(mask_k.sum(), 1) / depth
    mtp, balance = mtp * weight, sum_balance_loss(out.router_stats) * weight
    index_kl = sum_indexer_loss(out.indexer_stats) * weight
    aux = {"ce": ce, "mtp_loss": mtp, "balance_loss": balance, "indexer_kl": index_kl,
           "indexer_mass": mean_indexer_mass(out.indexer_stats) * weight, "loads": expert_loads(out.router_stats)}
    return ce + mtp_lambda * mtp + balance + index_kl, aux


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


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple:
    """The rows of a step must split evenly over the micro-batches; rows go over the mesh's batch shards that
    divide them and the sequence over the rest (context parallelism), which it must divide. Returns the rules
    table of that layout (sharding.rules_for)."""
    rows, accum = config.data.batch_size, config.grad_accum
    if rows % accum:
        raise ConfigError(f"config.data.batch_size={rows} must divide by grad_accum={accum}")
    row_axes, length_axes = sharding.data_layout(mesh, rows // accum)
    shards = math.prod(mesh.shape[a] for a in length_axes)
    if config.data.seq_len % shards:
        raise ConfigError(f"config.data.batch_size={rows} (/ grad_accum={accum}) gives too few rows for the batch "
                          f"shards of the mesh {dict(mesh.shape)}, so the sequence is split over {length_axes} "
                          f"({shards} ways), but data.seq_len={config.data.seq_len} does not divide by {shards}; "
                          "change data.batch_size, data.seq_len or the mesh")
    if shards > 1 and jax.process_count() > 1:
        raise ConfigError(f"context parallelism (data.batch_size={rows} rows over the mesh {dict(mesh.shape)}) runs "
                          "in one process for now: every process would need whole rows; give each batch shard a row")
    return sharding.rules(row_axes, length_axes)


def is_indexer(path: tuple) -> bool:
    """A param of a DSA lightning indexer (the one part the warm-up trains)."""
    return "indexer" in path


def stage_model(config: ml_collections.ConfigDict, cfg: ModelConfig) -> ModelConfig:
    """The model as a stage trains it: dense attention in the DSA warm-up, as configured otherwise."""
    return cfg.replace(dsa_mode="dense") if config.stage == "dsa_warmup" else cfg


def stage_trainable(config: ml_collections.ConfigDict) -> Callable[[tuple], bool] | None:
    """Which params a stage trains (None: all): the DSA warm-up trains only the indexer."""
    return is_indexer if config.stage == "dsa_warmup" else None


def make_train_step(config: ml_collections.ConfigDict, cfg: ModelConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
    """train_step with a run config's options bound."""
    trainable = stage_trainable(config)
    return functools.partial(train_step, cfg=stage_model(config, cfg), tx=tx, schedule=schedule,
                             mtp_lambda=config.mtp_lambda,
                             bias_update_speed=0.0 if trainable else config.bias_update_speed,
                             grad_accum=config.grad_accum, ce_chunk=config.ce_chunk,
                             expert_grad_dtype=config.expert_grad_dtype, offload=config.optim.offload,
                             trainable=trainable)


def train_step(state: TrainState, batch: dict, *, cfg: ModelConfig, tx: optax.GradientTransformation,
               schedule: optax.Schedule, mtp_lambda: float, bias_update_speed: float, grad_accum: int = 1,
               ce_chunk: int = 0, expert_grad_dtype: str = "float32", offload: bool = False,
               trainable: Callable[[tuple], bool] | None = None):
    """batch: tokens, positions, segment_ids, each [batch, length]. Returns (new state, metrics).
    offload: the optimizer state lives in host memory (see abstract_state); it comes to the device only
    for the update, after the gradients are complete. trainable(param path) -> False: the param gets no
    gradient computed (zeros; the optimizer must freeze it too), as in the DSA warm-up."""
    _, mask = batch_targets(batch, 1)
    n_tokens = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
    micro = jax.tree_util.tree_map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
    flat = traverse_util.flatten_dict(cast_experts(state.params, expert_grad_dtype))
    train_keys = [k for k in flat if trainable is None or trainable(k)]

    def grads_of(mb):
        def loss(train):  # differentiated w.r.t. the trained params only
            params = traverse_util.unflatten_dict(flat | dict(zip(train_keys, train, strict=True)))
            return loss_terms(cfg, params, mb, mtp_lambda, n_tokens, 1.0 / grad_accum, ce_chunk)

        (_, aux), train_grads = jax.value_and_grad(loss, has_aux=True)([flat[k] for k in train_keys])
        grads = {k: jnp.zeros_like(v) for k, v in flat.items()} | dict(zip(train_keys, train_grads, strict=True))
        return traverse_util.unflatten_dict(grads), aux

    if grad_accum == 1:
        grads, aux = grads_of(batch)
    else:
        def accumulate(carry, mb):
            return jax.tree_util.tree_map(jnp.add, carry, grads_of(mb)), None

        # the sum is float32 whatever the gradients' dtype (V3 sec. 3.3.3: gradients accumulate in FP32)
        zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)),
                                       jax.eval_shape(grads_of, batch))
        (grads, aux), _ = jax.lax.scan(accumulate, zeros, micro)
    opt_state = jax.device_put(state.opt_state, jax.memory.Space.Device) if offload else state.opt_state
    updates, opt_state = tx.update(grads, opt_state, state.params)
    if offload:
        opt_state = jax.device_put(opt_state, jax.memory.Space.Host)
    params = optax.apply_updates(state.params, updates)
    if cfg.topk_method == "noaux_tc" and bias_update_speed:
        params = update_bias(params, aux["loads"], bias_update_speed)
    objective = aux["indexer_kl"] if trainable else aux["ce"] + mtp_lambda * aux["mtp_loss"] + aux["balance_loss"]
    metrics = {
        "loss": objective + (0.0 if trainable else aux["indexer_kl"]),
        "ce": aux["ce"], "mtp_loss": aux["mtp_loss"], "balance_loss": aux["balance_loss"],
        "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
        "expert_load_max_mean": load_imbalance(aux["loads"]), "tokens": n_tokens,
    }
    if cfg.dsa:
        metrics |= {"indexer_kl": aux["indexer_kl"]}
        if cfg.dsa_mode == "dense":
            metrics |= {"indexer_mass": aux["indexer_mass"]}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def cast_experts(params: Any, dtype: str) -> Any:
    """Routed-expert weights (V3: 96% of the params) cast to `dtype` before the forward pass, so their
    gradients come out in `dtype`; the experts compute in the model dtype anyway."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: v.astype(dtype) if "experts" in k else v for k, v in flat.items()})


def eval_step(params: Any, batch: dict, *, cfg: ModelConfig) -> dict[str, jax.Array]:
    """Summed next-token CE and target count, to be pooled over eval batches. With DSA also, from a dense-attention
    pass, the indexer KL and the share of the attention mass its top-k keys capture (means over layers)."""
    args = batch["tokens"], batch["positions"], batch["segment_ids"]
    out = forward(cfg, params, *args)
    targets, mask = batch_targets(batch, 1)
    metrics = {"ce_sum": cross_entropy_sum(out.logits, targets, mask), "count": mask.sum().astype(jnp.float32)}
    if cfg.dsa:
        dense = forward(cfg.replace(dsa_mode="dense"), params, *args, indexer_loss=True).indexer_stats
        metrics |= {"indexer_kl": sum_indexer_loss(dense), "indexer_mass": mean_indexer_mass(dense)}
    return metrics
