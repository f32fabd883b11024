"""RoPE on interleaved pairs with YaRN, against the formulas of V2 appendix B."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.layers.rope import apply_rope, inv_frequencies, rope_cos_sin


def test_plain_frequencies():
    cfg = tiny_config(rope_type="default", rope_factor=1.0, qk_rope_head_dim=8, rope_theta=10000.0)
    np.testing.assert_allclose(inv_frequencies(cfg), 10000.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)


def test_yarn_frequencies_and_scale():
    # rope dim 16, factor 4, original 64: correction dims d ln(L / (2 pi b)) / (2 ln theta) for b = 32 and 1
    # are -0.99 and 2.02, so the ramp runs over [max(floor(-0.99), 0), ceil(2.02)] = [0, 3]
    cfg = tiny_config(qk_rope_head_dim=16, rope_factor=4.0, original_max_position_embeddings=64,
                      mscale=0.707, mscale_all_dim=0.707)
    base = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    ramp = np.clip(np.arange(8) / 3, 0, 1)
    np.testing.assert_allclose(inv_frequencies(cfg), base * (1 - ramp) + base / 4 * ramp, rtol=1e-6)
    np.testing.assert_allclose(inv_frequencies(cfg) / base, [1, 0.75, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25], rtol=1e-6)
    m = 0.1 * 0.707 * math.log(4) + 1
    np.testing.assert_allclose(cfg.softmax_scale, (16 + 16) ** -0.5 * m * m, rtol=1e-12)
    np.testing.assert_allclose(cfg.softmax_scale, 0.213127, rtol=1e-5)  # HF's value for this config


def test_interleaved_pairs_rotate():
    cfg = tiny_config(rope_type="default", rope_factor=1.0)
    x = jnp.arange(8.0).reshape(1, 1, 1, 8) + 1
    cos, sin = rope_cos_sin(cfg, jnp.array([[3]]))
    y = np.asarray(apply_rope(x, cos, sin))[0, 0, 0]
    theta = 3 * inv_frequencies(cfg)
    pairs = np.asarray(x)[0, 0, 0].reshape(4, 2)
    want = np.stack([pairs[:, 0] * np.cos(theta) - pairs[:, 1] * np.sin(theta),
                     pairs[:, 0] * np.sin(theta) + pairs[:, 1] * np.cos(theta)], 1).ravel()
    np.testing.assert_allclose(y, want, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(-200, 200), yarn=st.booleans())
def test_scores_depend_only_on_relative_position(m, n, shift, yarn):
    cfg = tiny_config(rope_factor=4.0 if yarn else 1.0, rope_type="yarn" if yarn else "default")
    q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))

    def score(i, j):
        cq, sq = rope_cos_sin(cfg, jnp.array([[i]]))
        ck, sk = rope_cos_sin(cfg, jnp.array([[j]]))
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    m2, n2 = m + abs(shift), n + abs(shift)
    np.testing.assert_allclose(score(m, n), score(m2, n2), rtol=1e-4, atol=1e-4)
