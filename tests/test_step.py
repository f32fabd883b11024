"""train/step.py: the memory options of the train step leave its numbers alone (8 simulated CPU devices)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepseek_jax import sharding
from deepseek_jax.model import init_params
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import abstract_state, init_state, shardings_of, train_step

OPTIM = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, decay_start=1.0, final_lr_ratio=0.1, b1=0.9, b2=0.95,
                                       eps=1e-8, weight_decay=0.1, clip=1.0, moment_dtype="bfloat16"))


def run_steps(cfg, n=2, **options):
    """n train steps from the same init and batch; returns (params, metrics of the last step)."""
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    tx, schedule = make_optimizer(OPTIM, 10)
    state_sh = shardings_of(abstract_state(cfg, tx, mesh, offload=options.get("offload", False)))
    tokens = jax.random.randint(jax.random.key(3), (8, 16), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(16), (8, 16)),
             "segment_ids": jnp.ones((8, 16), jnp.int32)}
    step = functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule, mtp_lambda=0.3, bias_update_speed=1e-3,
                             **options)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state = jax.jit(lambda: init_state(init_params(cfg, jax.random.key(0)), tx), out_shardings=state_sh)()
        step = jax.jit(step, out_shardings=(state_sh, None))
        for _ in range(n):
            state, metrics = step(state, batch)
    return jax.device_get(state.params), jax.device_get(metrics)


def test_host_offloaded_optimizer_state_gives_the_same_step(tiny_cfg):
    (p0, m0), (p1, m1) = run_steps(tiny_cfg), run_steps(tiny_cfg, offload=True)
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p0)


def test_bf16_expert_gradients_stay_close(tiny_cfg):
    """With bf16 compute the forward is unchanged (the experts are cast either way); the update moves by bf16
    rounding of the expert gradients only."""
    cfg = tiny_cfg.replace(dtype="bfloat16")
    (p0, m0), (p1, m1) = run_steps(cfg, n=1), run_steps(cfg, n=1, expert_grad_dtype="bfloat16")
    assert m1["loss"] == m0["loss"]
    np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4), p1, p0)
