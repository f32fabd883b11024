"""GRPO advantages and loss against float64 numpy references written with explicit loops, analytic gradients, TRL."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.rl.grpo import (
    LOSS_AGGREGATIONS,
    group_advantages,
    grpo_loss,
    informative_groups,
    overlong_penalty,
)
from deepseek_jax.rl.rollout import Rollout, keep_informative

TRL_REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "grpo", "trl_reference.json")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def np_advantages(rewards, group_size):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), group_size):
        group = np.asarray(rewards[start:start + group_size], np.float64)
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        for i, r in enumerate(group):
            out[start + i] = (r - mean) / (std + 1e-4)
    return out


def np_grpo_loss(logprobs, old, ref, adv, mask, epsilon, beta, loss_type, epsilon_high=None):
    """Eq. 3 token by token in float64 (DAPO eq. 10 with epsilon_high); returns (loss, metrics)."""
    high = epsilon if epsilon_high is None else epsilon_high
    batch, length = logprobs.shape
    per_token = np.zeros((batch, length))
    n_tokens, n_clipped, kl_sum, ratios = 0, 0, 0.0, []
    for b in range(batch):
        a = float(adv[b])
        for t in range(length):
            if not mask[b, t]:
                continue
            ratio = math.exp(float(logprobs[b, t]) - float(old[b, t]))
            clipped_ratio = min(max(ratio, 1 - epsilon), 1 + high)
            surrogate = min(ratio * a, clipped_ratio * a)
            kl = 0.0
            if beta:
                d = float(ref[b, t]) - float(logprobs[b, t])
                kl = math.exp(d) - d - 1
            per_token[b, t] = -(surrogate - beta * kl)
            n_tokens += 1
            n_clipped += (ratio < 1 - epsilon and a < 0) or (ratio > 1 + high and a > 0)
            kl_sum += kl
            ratios.append(ratio)
    if loss_type == "grpo":
        loss = 0.0
        for b in range(batch):
            n_b = sum(1 for t in range(length) if mask[b, t])
            if n_b:
                loss += sum(per_token[b, t] for t in range(length) if mask[b, t]) / n_b
        loss /= batch
    elif loss_type == "bnpo":
        loss = per_token.sum() / max(n_tokens, 1)
    else:
        loss = per_token.sum() / (batch * length)
    metrics = dict(clip_fraction=n_clipped / n_tokens, kl=kl_sum / n_tokens, ratio=sum(ratios) / n_tokens,
                   ratio_min=min(ratios), ratio_max=max(ratios))
    return loss, metrics


def random_inputs(seed, batch=8, length=12, group_size=4):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, batch)
    lengths[0], lengths[1] = length, 0  # one full completion, one without any token
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    mask[2, rng.integers(0, length, 3)] = 0  # holes inside a completion (e.g. tool output)
    old = -rng.uniform(0.01, 4.0, (batch, length)).astype(np.float32)
    logprobs = (old + rng.normal(0, 0.4, (batch, length))).astype(np.float32)  # ratios in and out of [0.8, 1.2]
    ref = (logprobs + rng.normal(0, 0.5, (batch, length))).astype(np.float32)
    adv = np.asarray(group_advantages(rng.normal(size=batch).astype(np.float32), group_size))
    return logprobs, old, ref, adv, mask


def test_advantages_match_numpy():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=24).astype(np.float32)
    rewards[8:12] = 0.7  # a group with all-equal rewards
    rewards[12:16] = rng.integers(0, 2, 4)  # 0/1 outcome rewards
    ours = np.asarray(group_advantages(jnp.asarray(rewards), 4))
    ref = np_advantages(rewards, 4)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours[8:12], 0.0)
    assert group_advantages(jnp.array([1, 0, 1, 1]), 2).dtype == jnp.float32


@pytest.mark.parametrize("rewards, group_size", [(np.zeros(10), 4), (np.zeros(6), 1), (np.zeros((2, 4)), 2)])
def test_advantages_reject_bad_groups(rewards, group_size):
    with pytest.raises(ValueError):
        group_advantages(rewards, group_size)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_matches_numpy(loss_type, beta, seed):
    logprobs, old, ref, adv, mask = random_inputs(seed)
    assert (adv > 0).any() and (adv < 0).any()
    ratio = np.exp(logprobs - old)[mask > 0]
    assert (ratio > 1.2).any() and (ratio < 0.8).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    loss, metrics = grpo_loss(*map(jnp.asarray, (logprobs, old, ref, adv, mask)), epsilon=0.2, beta=beta,
                              loss_type=loss_type)
    ref_loss, ref_metrics = np_grpo_loss(logprobs, old, ref, adv, mask, 0.2, beta, loss_type)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_metrics["clip_fraction"] > 0
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_clip_higher_matches_numpy(loss_type):
    """DAPO's decoupled clip (0.2, 0.28): tokens of positive-advantage samples may grow to 1.28 before clipping."""
    logprobs, old, ref, adv, mask = random_inputs(3)
    loss, metrics = grpo_loss(*map(jnp.asarray, (logprobs, old, ref, adv, mask)), epsilon=0.2, beta=0.04,
                              loss_type=loss_type, epsilon_high=0.28)
    want, want_metrics = np_grpo_loss(logprobs, old, ref, adv, mask, 0.2, 0.04, loss_type, epsilon_high=0.28)
    symmetric, _ = np_grpo_loss(logprobs, old, ref, adv, mask, 0.2, 0.04, loss_type)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), want_metrics["clip_fraction"], rtol=1e-6)
    assert abs(want - symmetric) > 1e-4  # some ratios fall in (1.2, 1.28] with A > 0


def test_dynamic_sampling_keeps_groups_with_reward_spread():
    rewards = np.array([1, 1, 1, 0, 0, 0, 1, 0, 2, 2, 2, 2], np.float32)  # in 3s: equal, equal, spread, equal
    np.testing.assert_array_equal(informative_groups(rewards[:8], 4), [True, True])
    np.testing.assert_array_equal(informative_groups(rewards, 3), [False, False, True, False])

    def rollout(r, tag):  # each row's token carries its origin
        n = len(r)
        return Rollout(np.full((n, 3), tag, np.int32) + np.arange(n)[:, None], np.ones((n, 2), np.float32),
                       np.asarray(r, np.float32), {"accuracy": np.asarray(r, np.float32)},
                       np.asarray(group_advantages(jnp.asarray(r, jnp.float32), 2)), [f"{tag}:{i}" for i in range(n)],
                       np.full(n, 2, np.int32))

    first, second = rollout([1, 1, 0, 1, 0, 0], 100), rollout([1, 0, 1, 1, 1, 0], 200)  # groups of 2
    batch, order = keep_informative([first, second], 2, 3)
    np.testing.assert_array_equal(order, [1, 3, 5])  # the informative groups, in order
    assert batch.completions == ["100:2", "100:3", "200:0", "200:1", "200:4", "200:5"]
    np.testing.assert_array_equal(batch.tokens[:, 0], [102, 103, 200, 201, 204, 205])
    np.testing.assert_array_equal(batch.rewards, [0, 1, 1, 0, 1, 0])
    assert (np.abs(batch.advantages) > 0.5).all()
    short, order = keep_informative([first], 2, 3)  # too few: topped up with uninformative groups
    np.testing.assert_array_equal(order, [1, 0, 2])
    np.testing.assert_array_equal(short.advantages[2:], 0.0)


def test_soft_overlong_punishment_matches_the_formula():
    """DAPO eq. 13 with L_max = 20, L_cache = 8: 0 up to 12 tokens, (12 - |y|) / 8 in (12, 20], -1 beyond."""
    lengths = np.arange(0, 25)
    want = [0.0 if n <= 12 else ((12 - n) / 8 if n <= 20 else -1.0) for n in lengths]
    np.testing.assert_allclose(overlong_penalty(lengths, 20, 8), want, rtol=1e-6, atol=1e-7)


def test_jit_and_ref_optional_at_beta_zero():
    logprobs, old, ref, adv, mask = map(jnp.asarray, random_inputs(3))
    loss_fn = jax.jit(grpo_loss, static_argnames=("epsilon", "beta", "loss_type"))
    with_ref, _ = loss_fn(logprobs, old, ref, adv, mask, beta=0.0)
    without_ref, metrics = loss_fn(logprobs, old, None, adv, mask, beta=0.0)
    assert float(with_ref) == float(without_ref) and float(metrics["kl"]) == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, old, None, adv, mask, beta=0.04)


def test_unknown_loss_type_lists_registered():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"bnpo.*dr_grpo.*grpo"):
        grpo_loss(x, x, x, jnp.zeros(2), x, loss_type="dapo")
    assert set(LOSS_AGGREGATIONS) == set(LOSS_TYPES)


def aggregation_weights(mask, loss_type):
    batch, length = mask.shape
    if loss_type == "grpo":
        return mask / (batch * np.maximum(mask.sum(1, keepdims=True), 1))
    if loss_type == "bnpo":
        return mask / mask.sum()
    return mask / (batch * length)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_on_policy_gradient_is_analytic(loss_type):
    """At ratio 1: d loss / d logprobs_t = -A_b w_bt; at logprobs == ref the KL gradient vanishes too."""
    logprobs, _, _, adv, mask = random_inputs(4)
    lp = jnp.asarray(logprobs)

    def grad(beta):
        loss = lambda x: grpo_loss(x, lp, lp, jnp.asarray(adv), jnp.asarray(mask), beta=beta, loss_type=loss_type)[0]
        return np.asarray(jax.grad(loss)(lp))

    expected = -adv[:, None] * aggregation_weights(mask, loss_type)
    np.testing.assert_allclose(grad(0.0), expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad(0.04), expected, rtol=1e-6, atol=1e-8)
    assert np.all(grad(0.0)[mask == 0] == 0)


def test_clip_stops_gradient():
    """Tokens where the clipped term is selected get no policy gradient; the others keep theirs."""
    old = jnp.zeros((4, 2))
    logprobs = jnp.log(jnp.array([[1.5, 1.1], [1.5, 1.1], [0.5, 0.9], [0.5, 0.9]]))
    adv = jnp.array([1.0, -1.0, -1.0, 1.0])
    mask = jnp.ones((4, 2))
    grads = jax.grad(lambda x: grpo_loss(x, old, None, adv, mask, beta=0.0)[0])(logprobs)
    assert grads[0, 0] == 0 and grads[2, 0] == 0  # ratio 1.5 with A > 0, ratio 0.5 with A < 0: clipped
    assert grads[1, 0] != 0 and grads[3, 0] != 0  # the unclipped (pessimistic) term is selected
    assert np.all(np.asarray(grads[:, 1]) != 0)  # inside the clip range
    _, metrics = grpo_loss(logprobs, old, None, adv, mask, beta=0.0)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 8)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_and_empty_sequences_are_harmless(loss_type):
    logprobs, old, ref, adv, mask = random_inputs(5)
    garbage = np.where(mask > 0, logprobs, -np.inf).astype(np.float32)
    garbage_ref = np.where(mask > 0, ref, np.nan).astype(np.float32)
    args = (jnp.asarray(old), jnp.asarray(garbage_ref), jnp.asarray(adv), jnp.asarray(mask))
    fn = lambda x: grpo_loss(x, *args, loss_type=loss_type)
    (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(garbage))
    ref_loss, _ = np_grpo_loss(logprobs, old, ref, adv, mask, 0.2, 0.04, loss_type)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(grads)).all() and np.all(np.asarray(grads)[mask == 0] == 0)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    empty, empty_metrics = grpo_loss(*map(jnp.zeros, [(2, 3)] * 3), jnp.ones(2), jnp.zeros((2, 3)), loss_type=loss_type)
    assert float(empty) == 0 and all(np.isfinite(float(v)) for v in empty_metrics.values())


def test_matches_trl():
    """Our loss, gradient and metrics equal TRL's GRPOTrainer._compute_loss (see fixtures/make_grpo_reference.py)."""
    with open(TRL_REFERENCE) as f:
        trl = json.load(f)
    inp = {k: np.asarray(v, np.float32) for k, v in trl["inputs"].items()}
    np.testing.assert_allclose(np.asarray(group_advantages(inp["rewards"], trl["group_size"])), trl["advantages"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(group_advantages(inp["rewards_tied"], trl["group_size"])),
                               trl["advantages_tied"], rtol=1e-5, atol=1e-6)
    adv = jnp.asarray(trl["advantages"], jnp.float32)
    assert {c["loss_type"] for c in trl["cases"]} == set(LOSS_TYPES) and {c["beta"] for c in trl["cases"]} == {0, 0.04}
    for case in trl["cases"]:
        fn = lambda x, case=case: grpo_loss(x, inp["old_logprobs"], inp["ref_logprobs"], adv, inp["mask"],
                                            epsilon=trl["epsilon"], beta=case["beta"], loss_type=case["loss_type"])
        (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(inp["logprobs"]))
        label = f"{case['loss_type']} beta={case['beta']}"
        np.testing.assert_allclose(float(loss), case["loss"], rtol=1e-5, atol=1e-6, err_msg=label)
        np.testing.assert_allclose(np.asarray(grads), case["grad"], rtol=1e-5, atol=1e-6, err_msg=label)
        np.testing.assert_allclose(float(metrics["clip_fraction"]), case["metrics"]["clip_ratio/region_mean"],
                                   rtol=1e-6, err_msg=label)
        np.testing.assert_allclose(float(metrics["kl"]), case["metrics"].get("kl", 0.0), rtol=1e-5, atol=1e-7,
                                   err_msg=label)
