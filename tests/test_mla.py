"""MLA: the absorbed form equals the decompressed one; masks keep documents apart."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from deepseek_jax.layers.mla import MLA
from deepseek_jax.layers.rope import rope_cos_sin
from deepseek_jax.model import attention_mask


@pytest.mark.parametrize("q_lora_rank", [48, None])
def test_absorbed_equals_naive(q_lora_rank):
    cfg = tiny_config(q_lora_rank=q_lora_rank)
    x = jax.random.normal(jax.random.key(0), (2, 10, cfg.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    cos, sin = rope_cos_sin(cfg, pos)
    mask = attention_mask(jnp.ones((2, 10), jnp.int32))
    params = MLA(cfg).init(jax.random.key(1), x, cos, sin, mask)
    naive, _ = MLA(cfg).apply(params, x, cos, sin, mask)
    absorbed, _ = MLA(cfg, absorb=True).apply(params, x, cos, sin, mask)
    np.testing.assert_allclose(absorbed, naive, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(naive).max()) > 1e-2


@pytest.mark.parametrize("chunk", [0, 2, 3, 4])
def test_attention_matches_numpy_softmax(chunk):
    cfg = tiny_config(num_attention_heads=2, attention_chunk=chunk)
    x = jax.random.normal(jax.random.key(2), (1, 6, cfg.hidden_size))
    cos, sin = rope_cos_sin(cfg, jnp.arange(6)[None])
    mask = attention_mask(jnp.ones((1, 6), jnp.int32))
    variables = MLA(cfg).init(jax.random.key(3), x, cos, sin, mask)
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    p = {k: (v["kernel"].value if isinstance(v, dict) and "kernel" in v else getattr(v, "value", v))
         for k, v in p.items()}
    out = np.asarray(MLA(cfg).apply(variables, x, cos, sin, mask)[0])[0]

    def rms(v):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + 1e-6)

    def rot(v, c, s):  # interleaved pairs
        a, b = v[..., 0::2], v[..., 1::2]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(v.shape)

    h = np.asarray(x)[0].astype(np.float64)
    c, s = (np.asarray(t)[0] for t in (cos, sin))
    q = np.einsum("tc,chd->thd", rms(h @ p["q_a"]), p["q_b"])
    kv = h @ p["kv_a"]
    ckv, kr = rms(kv[:, :32]), rot(kv[:, 32:], c, s)
    k_nope, v = np.einsum("sc,chd->shd", ckv, p["wkv_b"][..., :16]), np.einsum("sc,chd->shd", ckv, p["wkv_b"][..., 16:])
    scores = (np.einsum("thd,shd->hts", q[..., :16], k_nope)
              + np.einsum("thd,sd->hts", rot(q[..., 16:], c[:, None], s[:, None]), kr)) * cfg.softmax_scale
    scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("thd,hde->te", np.einsum("hts,shd->thd", probs, v), p["o"])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
