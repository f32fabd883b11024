"""MLA: the absorbed form equals the decompressed one; masks keep documents apart and are never materialized; the
Pallas flash kernel in the model equals the jnp path, on one device and under a mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, tiny_config

import deepseek_jax as dsj
from deepseek_jax import sharding
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


def _packed(batch: int, length: int):
    """Rows of 2-3 packed documents (and some padding, segment 0), positions restarting per document."""
    rng = np.random.default_rng(0)
    segments = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(3, length - 3), 2, replace=False))
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length - 2], strict=True)):
            segments[b, lo:hi], positions[b, lo:hi] = i + 1, np.arange(hi - lo)
    return jnp.asarray(positions), jnp.asarray(segments)


@pytest.mark.parametrize("mesh_sizes", [None, {"data": 2, "expert": 2, "tensor": 2}])
def test_flash_kernel_in_the_model_equals_xla(mesh_sizes):
    """attention_impl="pallas" (the FlashAttention kernel, interpreted on CPU; per shard under a mesh) gives the
    jnp path's loss and gradients on packed documents."""
    xla = tiny_config(attention_impl="xla", attention_chunk=8, qk_nope_head_dim=24)  # Triton tiles: dqk 32
    flash = xla.replace(attention_impl="pallas")
    params = dsj.init_params(xla, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 24), 0, xla.vocab_size)
    positions, segments = _packed(8, 24)

    def loss(cfg, p):
        out = dsj.forward(cfg, p, tokens, positions, segments)
        return jnp.sum(jnp.sin(out.logits)) + jnp.sum(jnp.cos(out.mtp_logits))

    want = jax.value_and_grad(loss, argnums=1)(xla, params)
    if mesh_sizes is None:
        got = jax.value_and_grad(loss, argnums=1)(flash, params)
    else:
        with jax.set_mesh(sharding.make_mesh(mesh_sizes)):
            got = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(flash, params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert_trees_close(got[1], want[1])


def _unfused_shapes(hlo: str) -> list[str]:
    """Result shapes of the instructions that own buffers: everything outside fusion bodies."""
    fused = set(re.findall(r"calls=(%[\w.\-]+)", hlo))
    shapes, inside = [], False
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            inside = name in fused
        elif not inside and " = " in line:
            shapes.append(line.split(" = ", 1)[1].split(" ", 1)[0])
    return shapes


@pytest.mark.parametrize("chunk,unroll", [(0, 8), (16, 8), (16, 0)])
def test_training_attention_never_materializes_a_mask(chunk, unroll):
    """The compiled training step holds no [.., T, T] mask, neither whole nor saved per query block or per layer
    for the backward pass: masks are built per block inside the fusions."""
    cfg = tiny_config(attention_impl="xla", attention_chunk=chunk, num_nextn_predict_layers=0, unroll_layers=unroll)
    params = dsj.init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((2, 64), jnp.int32)
    positions, segments = _packed(2, 64)
    step = jax.jit(jax.grad(lambda p: jnp.sum(dsj.forward(cfg, p, tokens, positions, segments).logits)))
    shapes = _unfused_shapes(step.lower(params).compile().as_text())
    assert any(s.startswith("f32[") for s in shapes)  # the parser sees the program's buffers
    masks = [s for s in shapes if s.startswith("pred[") and re.search(r"(64|16),64\]", s)]
    assert not masks, masks
