"""DeepSeek Sparse Attention (layers/indexer.py and MLA's selected path) against numpy: the indexer's scores (full
precision and the released FP8 path), the blockwise running top-k, attention over the selected keys, the indexer
losses of both training stages, and no [T, T] buffer in a compiled training step."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import tiny_config
from test_mla import _packed, _unfused_shapes

import deepseek_jax as dsj
from deepseek_jax.layers import indexer as dsa
from deepseek_jax.layers.indexer import Indexer
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.mla import MLA, AttentionMask
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.layers.rope import rope_cos_sin
from deepseek_jax.model import attention_mask

DSA = dict(index_n_heads=4, index_head_dim=16, index_topk=5)


def dsa_config(**kw):
    return tiny_config(**(DSA | kw))


def _params(variables):
    """{name: array} of a module's params, boxes removed."""
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(variables["params"]))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v, np.float64) for path, v in flat}


def _rot_halves(v, c, s):
    half = v.shape[-1] // 2
    a, b = v[..., :half], v[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)


def _rot_pairs(v, c, s):
    a, b = v[..., 0::2], v[..., 1::2]
    return np.stack([a * c - b * s, a * s + b * c], -1).reshape(v.shape)


def _rms(v):
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6)


def numpy_indexer(p, prefix, h, c_q, cos, sin, cfg):
    """Eq. 1 from the params: [T, S] index scores (causal mask not applied) of one row, float64."""
    heads, dim, rope = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
    q = np.einsum("tc,chd->thd", c_q, p[f"{prefix}wq_b/kernel"])
    k = h @ p[f"{prefix}wk/kernel"]
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6)
    k = k * p[f"{prefix}k_norm/scale"] + p[f"{prefix}k_norm/bias"]
    q = np.concatenate([_rot_halves(q[..., :rope], cos[:, None], sin[:, None]), q[..., rope:]], -1)
    k = np.concatenate([_rot_halves(k[..., :rope], cos, sin), k[..., rope:]], -1)
    w = h @ p[f"{prefix}weights_proj/kernel"] / np.sqrt(heads)
    return np.einsum("th,ths->ts", w, np.maximum(np.einsum("thd,sd->ths", q, k), 0.0)) / np.sqrt(dim)


def numpy_topk(scores, visible, k):
    """Per query the set of the k visible keys of largest score (all visible keys if fewer)."""
    out = []
    for t in range(scores.shape[0]):
        keys = np.flatnonzero(visible[t])
        out.append(set(keys[np.argsort(-scores[t, keys])][:k].tolist()))
    return out


def _mla_setup(cfg, length=12, batch=2, seed=0):
    x = jax.random.normal(jax.random.key(seed), (batch, length, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
    cos, sin = rope_cos_sin(cfg, pos)
    mask = attention_mask(jnp.ones((batch, length), jnp.int32))
    variables = _perturb_norms(MLA(cfg).init(jax.random.key(seed + 1), x, cos, sin, mask))
    return x, cos, sin, mask, variables


def _perturb_norms(variables):
    """The indexer's LayerNorm away from its (1, 0) init, so its scale and bias both matter."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.3 * jax.random.normal(jax.random.key(7), v.shape) if "k_norm" in str(path) else v,
        variables)


class _QueryLatentAndIndexer(nn.Module):
    """MLA's query latent c_Q and the indexer on it, as in the MLA module."""

    cfg: object

    @nn.compact
    def __call__(self, x, cos, sin):
        c_q = RMSNorm(1e-6, axis_name="q_lora", name="q_a_norm")(
            Linear(self.cfg.q_lora_rank, ("embed", "q_lora"), name="q_a")(x))
        return Indexer(self.cfg, name="indexer")(x, c_q, cos, sin)


def test_indexer_scores_match_numpy():
    cfg = dsa_config()  # YaRN: the indexer's halves rotate with MLA's frequencies and mscale
    x = jax.random.normal(jax.random.key(0), (2, 12, cfg.hidden_size))
    cos, sin = rope_cos_sin(cfg, jnp.broadcast_to(jnp.arange(12), (2, 12)))
    model = _QueryLatentAndIndexer(cfg)
    variables = _perturb_norms(model.init(jax.random.key(1), x, cos, sin))
    idx = model.apply(variables, x, cos, sin)
    got = np.asarray(dsa.scores(idx.q, idx.w, idx.k))
    p = _params(variables)
    h = np.asarray(x, np.float64)
    for b in range(x.shape[0]):
        c_q = _rms(h[b] @ p["q_a/kernel"]) * p["q_a_norm/scale"]
        want = numpy_indexer(p, "indexer/", h[b], c_q, np.asarray(cos[b]), np.asarray(sin[b]), cfg)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)
    assert np.abs(got).max() > 0.1


@pytest.mark.parametrize("key_block", [0, 7, 16])
def test_running_topk_equals_numpy_topk(key_block):
    """Blocks of keys merged into a running top-k select what one top-k over all visible keys selects, with
    packed documents; a query that sees fewer than k keys gets all of them and invalid slots after."""
    rng = np.random.default_rng(0)
    b, t, heads, dim, k = 2, 40, 3, 8, 6
    # offset so that q . k > 0 mostly: ReLU zeros in every head would tie keys at I = 0
    q = jnp.asarray(rng.standard_normal((b, t, heads, dim)) + 1.0, jnp.float32)
    w = jnp.asarray(rng.standard_normal((b, t, heads)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((b, t, dim)) + 1.0, jnp.float32)
    _, segments = _packed(b, t)
    mask = AttentionMask.causal(segments)
    slots, valid = dsa.select(q, w, keys, None, mask.positions(), segments, segments, k, key_block)
    scores = np.asarray(dsa.scores(q, w, keys))
    vis = np.asarray(dsa.visible(mask.positions(), segments, segments))
    for row in range(b):
        assert len(np.unique(scores[row][vis[row]])) == vis[row].sum()  # no ties to break
        want = numpy_topk(scores[row], vis[row], k)
        for i in range(t):
            got = set(np.asarray(slots[row, i])[np.asarray(valid[row, i])].tolist())
            assert got == want[i], (row, i)
    n_visible = vis.sum(-1)
    assert (n_visible < k).any() and (n_visible > k).any()
    np.testing.assert_array_equal(np.asarray(valid).sum(-1), np.minimum(n_visible, k))


def _hadamard_np(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def _e4m3(x):
    """1x128 tiles (here: the whole last axis of <= 128): s = amax / 448, q = e4m3(x / s) -> (q as float64, s)."""
    s = np.abs(x).max(-1, keepdims=True) / 448.0
    q = (x / np.where(s > 0, s, 1.0)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return q, s


def test_fp8_indexer_matches_numpy_and_mostly_agrees_with_full_precision():
    """The released code's path: Hadamard-rotated q and k in E4M3 with 1x128 scales, scored as
    sum_j w_j s^q_j ReLU(q8_j . k8) s^k / sqrt(d). The rotation alone leaves the scores unchanged."""
    rng = np.random.default_rng(1)
    b, t, s, heads, dim, k = 1, 64, 512, 8, 128, 64
    q = rng.standard_normal((b, t, heads, dim))
    w = rng.standard_normal((b, t, heads))
    keys = rng.standard_normal((b, s, dim))
    rot = _hadamard_np(dim)
    np.testing.assert_allclose(np.asarray(dsa.hadamard(dim)), rot, atol=1e-6)
    qr, kr = q @ rot, keys @ rot
    exact = np.einsum("bth,bths->bts", w, np.maximum(np.einsum("bthd,bsd->bths", q, keys), 0)) / np.sqrt(dim)
    rotated = np.einsum("bth,bths->bts", w, np.maximum(np.einsum("bthd,bsd->bths", qr, kr), 0)) / np.sqrt(dim)
    np.testing.assert_allclose(rotated, exact, atol=1e-9)
    (q8, qs), (k8, ks) = _e4m3(qr), _e4m3(kr)
    want = np.einsum("bth,bths->bts", w * qs[..., 0], np.maximum(np.einsum("bthd,bsd->bths", q8, k8), 0))
    want = want * ks[..., 0][:, None, :] / np.sqrt(dim)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    got = np.asarray(dsa.scores(f32(qr), f32(w), f32(kr), fp8=True))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    cached, scale = dsa.cached_keys(f32(kr), True, jnp.float32)  # the cache's codes + scales give the same
    np.testing.assert_allclose(np.asarray(dsa.scores(f32(qr), f32(w), cached, scale, fp8=True)), got, rtol=1e-6)
    overlap = np.mean([len(set(np.argsort(-got[0, i])[:k]) & set(np.argsort(-exact[0, i])[:k])) / k
                       for i in range(t)])
    assert overlap > 0.9, overlap  # FP8 moves only near-tied keys across the top-k boundary


def test_sparse_attention_equals_numpy_over_the_selected_keys():
    """MLA with DSA: softmax over the indexer's top-k visible keys only (the MQA form: all heads share them)."""
    cfg = dsa_config(rope_type="default", rope_factor=1.0, attention_chunk=4, index_key_block=4)
    x, cos, sin, mask, variables = _mla_setup(cfg)
    out = np.asarray(MLA(cfg).apply(variables, x, cos, sin, mask)[0])
    p = _params(variables)
    h = np.asarray(x, np.float64)
    nope, t = cfg.qk_nope_head_dim, x.shape[1]
    for b in range(x.shape[0]):
        c, s = np.asarray(cos[b]), np.asarray(sin[b])
        c_q = _rms(h[b] @ p["q_a/kernel"]) * p["q_a_norm/scale"]
        q = np.einsum("tc,chd->thd", c_q, p["q_b/kernel"])
        kv = h[b] @ p["kv_a/kernel"]
        ckv = _rms(kv[:, :cfg.kv_lora_rank]) * p["kv_a_norm/scale"]
        kr = _rot_pairs(kv[:, cfg.kv_lora_rank:], c, s)
        k_nope = np.einsum("sc,chd->shd", ckv, p["wkv_b"][..., :nope])
        v = np.einsum("sc,chd->shd", ckv, p["wkv_b"][..., nope:])
        scores = (np.einsum("thd,shd->hts", q[..., :nope], k_nope)
                  + np.einsum("thd,sd->hts", _rot_pairs(q[..., nope:], c[:, None], s[:, None]), kr)) * cfg.softmax_scale
        index = numpy_indexer(p, "indexer/", h[b], c_q, c, s, cfg)
        selected = numpy_topk(index, np.tril(np.ones((t, t), bool)), cfg.index_topk)
        keep = np.zeros((t, t), bool)
        for i, keys in enumerate(selected):
            keep[i, list(keys)] = True
        scores = np.where(keep, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        want = np.einsum("thd,hde->te", np.einsum("hts,shd->thd", probs, v), p["o/kernel"])
        np.testing.assert_allclose(out[b], want, rtol=1e-4, atol=1e-5)
    dense = np.asarray(MLA(cfg.replace(index_topk=t)).apply(variables, x, cos, sin, mask)[0])
    assert np.abs(dense - out).max() > 1e-2  # the selection matters


def test_kl_to_main_matches_numpy():
    rng = np.random.default_rng(2)
    valid = rng.random((2, 5, 9)) > 0.3
    valid[..., 0] = True
    p = np.where(valid, rng.random((2, 5, 9)), 0.0)
    p /= p.sum(-1, keepdims=True)
    p[0, 0] = np.where(valid[0, 0], 0.0, 0.0)
    p[0, 0, 0] = 1.0  # one-hot: p log p = 0 terms
    logits = rng.standard_normal((2, 5, 9))
    got = np.asarray(dsa.kl_to_main(jnp.asarray(p, jnp.float32), jnp.asarray(logits, jnp.float32),
                                    jnp.asarray(valid)))
    z = np.where(valid, logits, -np.inf)
    log_q = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    want = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.where(valid, log_q, 0.0)), 0.0), -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dense_warmup_loss_and_captured_mass_match_numpy():
    """Dense mode: p_main over every visible key (heads summed, L1-normalized) against softmax(I); the mass is
    p_main's share on the indexer's top-k keys."""
    cfg = dsa_config(rope_type="default", rope_factor=1.0, dsa_mode="dense", index_topk=4)
    x, cos, sin, mask, variables = _mla_setup(cfg, length=10, batch=1)
    _, stats = MLA(cfg).apply(variables, x, cos, sin, mask, mutable=["indexer_stats"])
    p = _params(variables)
    h, (c, s) = np.asarray(x, np.float64)[0], (np.asarray(cos[0]), np.asarray(sin[0]))
    nope, t = cfg.qk_nope_head_dim, x.shape[1]
    c_q = _rms(h @ p["q_a/kernel"]) * p["q_a_norm/scale"]
    q = np.einsum("tc,chd->thd", c_q, p["q_b/kernel"])
    kv = h @ p["kv_a/kernel"]
    ckv = _rms(kv[:, :cfg.kv_lora_rank]) * p["kv_a_norm/scale"]
    kr = _rot_pairs(kv[:, cfg.kv_lora_rank:], c, s)
    k_nope = np.einsum("sc,chd->shd", ckv, p["wkv_b"][..., :nope])
    scores = (np.einsum("thd,shd->hts", q[..., :nope], k_nope)
              + np.einsum("thd,sd->hts", _rot_pairs(q[..., nope:], c[:, None], s[:, None]), kr)) * cfg.softmax_scale
    causal = np.tril(np.ones((t, t), bool))
    probs = np.exp(np.where(causal, scores, -np.inf) - scores.max(-1, keepdims=True))
    p_main = (probs / probs.sum(-1, keepdims=True)).mean(0)
    index = np.where(causal, numpy_indexer(p, "indexer/", h, c_q, c, s, cfg), -np.inf)
    log_q = index - np.log(np.exp(index - index.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - index.max(-1, keepdims=True)
    kl = np.sum(np.where(causal, p_main * (np.log(np.where(causal, p_main, 1)) - np.where(causal, log_q, 0)), 0), -1)
    selected = numpy_topk(index, causal, cfg.index_topk)
    mass = np.array([p_main[i, list(sel)].sum() for i, sel in enumerate(selected)])
    np.testing.assert_allclose(float(stats["indexer_stats"]["kl"]), kl.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(stats["indexer_stats"]["mass"]), mass.mean(), rtol=1e-5)
    assert 0.3 < mass.mean() < 1.0


def _attention_grad_buffers(cfg, t: int) -> list[str]:
    """Buffer shapes of the compiled forward + backward of one DSA attention layer (its output and its indexer
    loss) over packed rows of t tokens."""
    x = jax.random.normal(jax.random.key(0), (2, t, cfg.hidden_size))
    positions, segments = _packed(2, t)
    cos, sin = rope_cos_sin(cfg, positions)
    mask = attention_mask(segments)
    variables = MLA(cfg).init(jax.random.key(1), x, cos, sin, mask)

    def loss(v, x):
        out, stats = MLA(cfg).apply(v, x, cos, sin, mask, mutable=["indexer_stats"])
        return jnp.sum(out[0]) + stats["indexer_stats"]["kl"]

    return _unfused_shapes(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile().as_text())


@pytest.mark.parametrize("chunk,key_block", [(32, 128), (0, 0)])
def test_sparse_training_attention_holds_no_t_by_t_buffer(chunk, key_block):
    """DSA attention at T = 384 with query blocks of 32, top-32 keys and key blocks of 128: no buffer (of any
    dtype) in the compiled forward + backward has two dims of T. Scoring every key of every query at once would
    (chunk 0, key_block 0): the check sees it."""
    t = 384
    cfg = dsa_config(attention_impl="xla", attention_chunk=chunk, index_topk=32, index_key_block=key_block,
                     max_position_embeddings=512)
    shapes = _attention_grad_buffers(cfg, t)
    assert any(s.startswith("f32[") and ",32,32" in s for s in shapes)  # the parser sees the selection's buffers
    square = [s for s in shapes if len(re.findall(rf"\b{t}\b", s.split("{")[0])) >= 2]
    assert bool(square) == (chunk == 0), square


def test_bad_dsa_configs_name_the_field():
    with pytest.raises(dsj.ConfigError, match="index_head_dim"):
        dsa_config(index_head_dim=8)  # = qk_rope_head_dim
    with pytest.raises(dsj.ConfigError, match="index_topk"):
        dsa_config(index_topk=0)
    with pytest.raises(dsj.ConfigError, match="q_lora_rank"):
        dsa_config(q_lora_rank=None)
