"""Fine-grained FP8 quantization (V3 sec. 3.3) against a numpy reference."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax import fp8


def np_quantize_tiles(x, bk, bn):
    """Reference: per bk x bn block, s = amax / 448, q = e4m3(x / s)."""
    k, n = x.shape
    q = np.zeros_like(x, dtype=ml_dtypes.float8_e4m3fn)
    s = np.zeros((-(-k // bk), -(-n // bn)), np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = x[i * bk:(i + 1) * bk, j * bn:(j + 1) * bn]
            s[i, j] = np.abs(blk).max() / 448.0
            q[i * bk:(i + 1) * bk, j * bn:(j + 1) * bn] = (blk / (s[i, j] if s[i, j] > 0 else 1.0)).astype(q.dtype)
    return q, s


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (128, 1)])
def test_weight_blocks_match_reference(shape):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32) * np.linspace(0.01, 5, shape[1])
    q, s = fp8.quantize_weights(jnp.asarray(w))
    want_q, want_s = np_quantize_tiles(w, 128, 128)
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), want_q.astype(np.float32))
    back = np.asarray(fp8.dequantize_weights(q, s))
    assert np.abs(back - w).max() <= np.abs(w).max() * 2**-4  # e4m3 keeps 3 mantissa bits


def test_activation_tiles_match_reference():
    x = np.random.default_rng(1).normal(size=(3, 5, 300)).astype(np.float32)
    q, s = fp8.quantize_activations(jnp.asarray(x))
    assert s.shape == (3, 5, 3)
    want_q, want_s = np_quantize_tiles(x.reshape(15, 300), 1, 128)
    np.testing.assert_allclose(np.asarray(s).reshape(15, 3), want_s, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q).reshape(15, 300).astype(np.float32), want_q.astype(np.float32))


def test_zero_tiles_give_zeros_not_nan():
    x = jnp.zeros((4, 256)).at[0, :3].set(1.0)
    q, s = fp8.quantize_activations(x)
    assert not np.isnan(np.asarray(q, np.float32)).any() and float(s[1, 0]) == 0.0
    w = jnp.zeros((256, 256)).at[:128, :128].set(2.0)
    qw, sw = fp8.quantize_weights(w)
    back = np.asarray(fp8.dequantize_weights(qw, sw))
    assert not np.isnan(back).any()
    np.testing.assert_array_equal(back, np.asarray(w))
