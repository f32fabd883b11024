"""train/losses.py: the chunked head + CE equals the whole-logits CE in value and gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import init_params
from deepseek_jax.train.losses import chunked_cross_entropy_sum, cross_entropy_sum, shifted_targets
from deepseek_jax.train.step import loss_terms


@pytest.mark.parametrize("chunk", [0, 4, 8, 32])
def test_chunked_ce_equals_whole_logits_ce(chunk):
    kx, kw, kt, km = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (3, 32, 16))
    w = jax.random.normal(kw, (16, 50)) * 0.3
    targets = jax.random.randint(kt, (3, 32), 0, 50)
    mask = jax.random.bernoulli(km, 0.8, (3, 32))

    def whole(x, w):  # log-softmax in numpy terms: logsumexp - target logit over the full [3, 32, 50] logits
        logits = x @ w
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(nll * mask)

    def chunked(x, w):
        return chunked_cross_entropy_sum(x, lambda h: h @ w, targets, mask, chunk)

    with jax.default_matmul_precision("highest"):
        (v0, g0), (v1, g1) = (jax.value_and_grad(f, argnums=(0, 1))(x, w) for f in (whole, chunked))
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(g1, g0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunk_must_divide_length():
    with pytest.raises(ValueError, match="does not divide"):
        chunked_cross_entropy_sum(jnp.zeros((1, 10, 4)), lambda h: h, jnp.zeros((1, 10), int),
                                  jnp.ones((1, 10), bool), 4)


def test_model_loss_with_chunked_head_matches_full_logits(tiny_cfg):
    """Main and MTP heads through the chunked CE: the loss and every parameter's gradient are unchanged."""
    params = init_params(tiny_cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, tiny_cfg.vocab_size)
    segment_ids = jnp.array([[1] * 10 + [2] * 6, [1] * 16])
    batch = {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)), "segment_ids": segment_ids}
    n_tokens = shifted_targets(tokens, segment_ids, 1)[1].sum().astype(jnp.float32)
    grad = functools.partial(jax.value_and_grad(loss_terms, argnums=1, has_aux=True), tiny_cfg)
    with jax.default_matmul_precision("highest"):
        (v0, aux0), g0 = grad(params, batch, 0.3, n_tokens, 1.0, 0)
        (v1, aux1), g1 = grad(params, batch, 0.3, n_tokens, 1.0, 4)
    assert aux1["mtp_loss"] > 0
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(aux1["ce"], aux0["ce"], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g0)


def test_cross_entropy_sum_is_masked_nll():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    got = cross_entropy_sum(logits, jnp.array([[0, 2]]), jnp.array([[True, False]]))
    np.testing.assert_allclose(got, -np.log(0.5), rtol=1e-6)
