"""DeepSeekMoE: routing rules against a per-token numpy reference, and the dropless expert compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.layers.gmm import grouped_matmul
from deepseek_jax.layers.moe import MoE, route


def np_route(cfg, scores, bias):
    """One token at a time, straight from V3 eq. 12-16 / V2's group-limited greedy."""
    n_exp, per_group = scores.shape[1], scores.shape[1] // cfg.n_group
    weights, ids = [], []
    for s in scores.astype(np.float64):
        choice = s + (bias if bias is not None else 0)
        allowed = np.arange(n_exp)
        if cfg.topk_method != "greedy":
            groups = choice.reshape(cfg.n_group, per_group)
            gscore = np.sort(groups, 1)[:, -2:].sum(1) if cfg.topk_method == "noaux_tc" else groups.max(1)
            kept = np.argsort(-gscore, kind="stable")[: cfg.topk_group]
            allowed = np.concatenate([np.arange(g * per_group, (g + 1) * per_group) for g in kept])
        top = allowed[np.argsort(-choice[allowed], kind="stable")[: cfg.num_experts_per_tok]]
        w = s[top]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        order = np.argsort(top)
        ids.append(top[order])
        weights.append(w[order] * cfg.routed_scaling_factor)
    return np.array(weights), np.array(ids)


def sorted_by_id(w, idx):
    w, idx = np.asarray(w), np.asarray(idx)
    order = np.argsort(idx, axis=1)
    return np.take_along_axis(w, order, 1), np.take_along_axis(idx, order, 1)


ROUTERS = [
    dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5),
    dict(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=16.0, n_group=1,
         topk_group=1),
]


@pytest.mark.parametrize("kw", ROUTERS)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_route_matches_per_token_reference(kw, seed):
    cfg = tiny_config(**kw)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(24, cfg.n_routed_experts)).astype(np.float32) * 2
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits)
    bias = rng.normal(size=cfg.n_routed_experts).astype(np.float32) * 0.3 if cfg.topk_method == "noaux_tc" else None
    w, idx = sorted_by_id(*route(cfg, scores, None if bias is None else jnp.asarray(bias)))
    want_w, want_idx = np_route(cfg, np.asarray(scores), bias)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(w, want_w, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_router_respects_groups(seed):
    cfg = tiny_config(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)
    rng = np.random.default_rng(seed)
    scores = jax.nn.sigmoid(jnp.asarray(rng.normal(size=(64, 32)), jnp.float32))
    bias = jnp.asarray(rng.normal(size=32) * 0.5, jnp.float32)
    _, idx = route(cfg, scores, bias)
    groups = np.asarray(idx) // 4
    choice = np.asarray(scores + bias).reshape(64, 8, 4)
    best = np.argsort(-np.sort(choice, -1)[..., -2:].sum(-1), axis=1)[:, :3]
    for t in range(64):
        assert set(groups[t]) <= set(best[t]), "an expert outside the kept groups was chosen"
        assert len(set(idx[t].tolist())) == 6


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_bias_changes_selection_not_weights(seed):
    cfg = tiny_config()
    rng = np.random.default_rng(seed)
    scores = jax.nn.sigmoid(jnp.asarray(rng.normal(size=(32, 16)), jnp.float32))
    favoured = int(rng.integers(16))
    bias = jnp.zeros(16).at[favoured].set(10.0)  # forces the favoured expert into every top-k
    _w0, idx0 = route(cfg, scores, jnp.zeros(16))
    w1, idx1 = route(cfg, scores, bias)
    assert np.all(np.any(np.asarray(idx1) == favoured, axis=1))
    assert not np.array_equal(np.sort(idx0, 1), np.sort(idx1, 1))
    # weights come from the unbiased scores of whatever was chosen
    s = np.take_along_axis(np.asarray(scores), np.asarray(idx1), 1)
    np.testing.assert_allclose(np.asarray(w1), s / s.sum(1, keepdims=True) * cfg.routed_scaling_factor, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12), tile=st.sampled_from([None, 8, 16, 32]))
def test_grouped_matmul_paths_agree(sizes, tile):
    rows = sum(sizes)
    if rows == 0:
        return
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 12)).astype(np.float32)
    w = rng.normal(size=(len(sizes), 12, 7)).astype(np.float32)
    want = np.concatenate([x[a:b] @ w[g] for g, (a, b) in enumerate(zip(np.cumsum([0, *sizes])[:-1],
                                                                         np.cumsum(sizes), strict=True))])
    gs = jnp.asarray(sizes, jnp.int32)
    for impl in ("tiled", "ragged"):
        np.testing.assert_allclose(grouped_matmul(x, w, gs, impl=impl, tile=tile), want, rtol=1e-5, atol=1e-5)


def np_moe(cfg, p, x):
    """Per-token loop: y_t = shared(x_t) + sum_k g_tk FFN_{e_tk}(x_t)."""
    def silu(a):
        return a / (1 + np.exp(-a))

    def ffn(v, g, u, d):
        return (silu(v @ g) * (v @ u)) @ d

    r = {k: np.asarray(v, np.float64) for k, v in p["router"].items() if k != "gate"}
    logits = x @ np.asarray(p["router"]["gate"]["kernel"], np.float64)
    scores = 1 / (1 + np.exp(-logits))
    w, ids = np_route(cfg, scores, r.get("e_score_correction_bias"))
    e = {k: np.asarray(v, np.float64) for k, v in p["experts"].items()}
    sh = {k: np.asarray(v["kernel"], np.float64) for k, v in p["shared"].items()}
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        out[t] = ffn(x[t], sh["gate"], sh["up"], sh["down"])
        for wk, ek in zip(w[t], ids[t], strict=True):
            out[t] += wk * ffn(x[t], e["gate"][ek], e["up"][ek], e["down"][ek])
    return out


@pytest.mark.parametrize("impl", ["tiled", "ragged"])
def test_moe_equals_per_token_loop(impl):
    cfg = tiny_config(moe_impl=impl)
    x = jax.random.normal(jax.random.key(0), (2, 12, cfg.hidden_size))
    params = nn.meta.unbox(MoE(cfg).init(jax.random.key(1), x)["params"])
    params["router"]["e_score_correction_bias"] = jax.random.normal(jax.random.key(2), (16,)) * 0.1
    y, stats = MoE(cfg).apply({"params": params}, x, mutable=["router_stats"])
    want = np_moe(cfg, params, np.asarray(x, np.float64).reshape(-1, cfg.hidden_size))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.hidden_size), want, rtol=1e-4, atol=1e-5)
    load = np.asarray(stats["router_stats"]["router"]["expert_load"])
    assert load.sum() == 24 * cfg.num_experts_per_tok  # dropless: every token reaches all k experts


def test_moe_gradients_tiled_equal_ragged():
    x = jax.random.normal(jax.random.key(0), (2, 16, 64))
    cfgs = [tiny_config(moe_impl=i) for i in ("tiled", "ragged")]
    params = MoE(cfgs[0]).init(jax.random.key(1), x)["params"]

    def loss(p, x, cfg):
        y, _ = MoE(cfg).apply({"params": p}, x, mutable=["router_stats"])
        return jnp.sum(jnp.sin(y))

    (g1, gx1), (g2, gx2) = (jax.grad(loss, argnums=(0, 1))(params, x, c) for c in cfgs)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(jax.tree_util.tree_leaves(g1["experts"])[0]).max()) > 0


def test_balance_loss_matches_formula():
    """L = alpha * mean_b sum_i f_i P_i with f_i = E/(K T) * count_i and P_i = mean_t s_i / sum_j s_j (V3 eq. 17-20)."""
    cfg = tiny_config(aux_loss_alpha=0.01)
    x = jax.random.normal(jax.random.key(3), (2, 10, 64))
    params = MoE(cfg).init(jax.random.key(4), x)["params"]
    _, stats = MoE(cfg).apply({"params": params}, x, mutable=["router_stats"])
    kernel = np.asarray(params["router"]["gate"]["kernel"].value, np.float64)
    s = 1 / (1 + np.exp(-(np.asarray(x, np.float64) @ kernel)))
    total = 0.0
    for b in range(2):
        _, ids = np_route(cfg, s[b], np.zeros(16))
        f = np.bincount(ids.ravel(), minlength=16) * 16 / (cfg.num_experts_per_tok * 10)
        p = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
        total += 0.01 * (f * p).sum() / 2
    np.testing.assert_allclose(float(stats["router_stats"]["router"]["balance_loss"]), total, rtol=1e-5)
