"""AdamW with the V3 schedule: Adam against optax, the schedule against its formula, the frozen bias."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from deepseek_jax.train.optimizer import lr_schedule, make_optimizer, scale_by_adam


def test_adam_matches_optax_and_bf16_moments_stay_close():
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
    ours, ref, low = scale_by_adam(0.9, 0.95, 1e-8), optax.scale_by_adam(0.9, 0.95, 1e-8), \
        scale_by_adam(0.9, 0.95, 1e-8, jnp.bfloat16)
    s1, s2, s3 = ours.init(params), ref.init(params), low.init(params)
    for i in range(5):
        g = {"w": jnp.sin(params["w"] * (i + 1))}
        u1, s1 = ours.update(g, s1)
        u2, s2 = ref.update(g, s2)
        u3, s3 = low.update(g, s3)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)
    assert s3.mu["w"].dtype == s3.nu["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(u3["w"], u2["w"], rtol=0.05, atol=0.02)


def test_schedule_warmup_constant_cosine():
    f = lr_schedule(1.0, steps=100, warmup_steps=10, decay_start=0.5, final_lr_ratio=0.1)
    assert float(f(0)) == 0.0 and math.isclose(float(f(5)), 0.5, rel_tol=1e-6)
    assert float(f(10)) == 1.0 and float(f(49)) == 1.0
    t = 25 / 50  # halfway through the cosine from step 50 to 100
    np.testing.assert_allclose(float(f(75)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)), rtol=1e-5)
    np.testing.assert_allclose(float(f(100)), 0.1, rtol=1e-5)


def test_bias_is_frozen_and_vectors_are_not_decayed():
    optim = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=0, decay_start=1.0, final_lr_ratio=0.1, b1=0.9,
                                           b2=0.95, eps=1e-8, weight_decay=0.5, clip=1.0, moment_dtype="float32"))
    tx, _ = make_optimizer(optim, steps=10)
    params = {"router": {"e_score_correction_bias": jnp.ones(4), "gate": {"kernel": jnp.ones((2, 4))}},
              "norm": {"scale": jnp.ones(4)}}
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(updates["router"]["e_score_correction_bias"], 0.0)  # no step, no decay
    np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)  # vectors: no weight decay
    np.testing.assert_allclose(updates["router"]["gate"]["kernel"], -0.1 * 0.5, rtol=1e-6)  # -lr * wd * w
