"""The whole model: causality, MTP inputs, packed documents, scan over depth, init statistics."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import assert_trees_close, tiny_config

import deepseek_jax as dsj
from deepseek_jax.model import DeepSeekV3


def test_causal_and_mtp_lookahead(tiny_cfg):
    params = dsj.init_params(tiny_cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, tiny_cfg.vocab_size)
    changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % tiny_cfg.vocab_size)
    a, b = dsj.forward(tiny_cfg, params, tokens), dsj.forward(tiny_cfg, params, changed)
    # the main model at position i sees tokens <= i
    np.testing.assert_array_equal(a.logits[0, :6], b.logits[0, :6])
    assert np.abs(a.logits[0, 6:] - b.logits[0, 6:]).max() > 1e-4
    # MTP module 1 at position i also embeds t_{i+1}: positions <= 4 are unaffected, position 5 is
    np.testing.assert_array_equal(a.mtp_logits[0, 0, :5], b.mtp_logits[0, 0, :5])
    assert np.abs(a.mtp_logits[0, 0, 5] - b.mtp_logits[0, 0, 5]).max() > 1e-4
    assert a.mtp_logits.shape == (1, 1, 10, tiny_cfg.vocab_size)


def test_packed_documents_do_not_attend_across(tiny_cfg):
    params = dsj.init_params(tiny_cfg, jax.random.key(0))
    docs = [jax.random.randint(jax.random.key(i), (1, n), 0, 128) for i, n in ((2, 5), (3, 7))]
    packed = jnp.concatenate(docs, axis=1)
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    out = dsj.forward(tiny_cfg, params, packed, positions, segments).logits
    alone = dsj.forward(tiny_cfg, params, docs[1]).logits
    np.testing.assert_allclose(out[:, 5:], alone, rtol=1e-5, atol=1e-5)


def test_scan_keeps_program_size_flat():
    """Layers run under nn.scan: the lowered program does not grow with depth."""
    def hlo_size(layers):
        cfg = tiny_config(num_hidden_layers=layers, num_nextn_predict_layers=0, unroll_layers=0)
        params = jax.eval_shape(DeepSeekV3(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        return len(jax.jit(DeepSeekV3(cfg).apply).lower(params, jnp.zeros((1, 8), jnp.int32)).as_text())

    assert hlo_size(16) < 1.05 * hlo_size(3)


def test_init_statistics_and_logical_axes(tiny_cfg):
    params = dsj.init_params(tiny_cfg, jax.random.key(0))
    np.testing.assert_allclose(float(jnp.std(params["layers_1"]["mlp"]["experts"]["gate"])), 0.1, rtol=0.05)
    np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
    boxed = dsj.model.abstract_params(tiny_cfg)
    spec = boxed["layers_1"]["mlp"]["experts"]["gate"].names
    assert spec == ("layers", "experts", "embed", "mlp")
    names = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x: x.names, boxed, is_leaf=lambda x: hasattr(x, "names")))
    assert all(isinstance(n, (str, type(None))) for n in names)


def test_unrolled_layers_equal_the_scan():
    """Short runs of blocks are unrolled (unroll_layers): same params, same logits and gradients as the loop."""
    scan, unrolled = tiny_config(unroll_layers=0), tiny_config(unroll_layers=8)
    params = dsj.init_params(scan, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, scan.vocab_size)

    def loss(cfg, p):
        out = dsj.forward(cfg, p, tokens)
        return jnp.sum(jnp.sin(out.logits)) + jnp.sum(jnp.cos(out.mtp_logits))

    structure = jax.tree_util.tree_structure(dsj.init_params(unrolled, jax.random.key(0)))
    assert structure == jax.tree_util.tree_structure(params)
    (l0, g0), (l1, g1) = (jax.value_and_grad(loss, argnums=1)(cfg, params) for cfg in (scan, unrolled))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert_trees_close(g1, g0)
    text = jax.jit(lambda p: dsj.forward(unrolled, p, tokens).logits).lower(params).compile().as_text()
    loops = [line for line in text.splitlines() if " while(" in line and "searchsorted" not in line]
    assert not loops, loops  # one dense and two MoE blocks: straight-line code (the only loops are searchsorted's)
