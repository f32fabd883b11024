"""Fine-grained FP8 (V3 sec. 3.3): the quantizers and fp8_matmul's three GEMMs against a float64 numpy reference."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax import ConfigError, ModelConfig, fp8


def np_quantize_tiles(x, bk, bn, ue8m0=False):
    """Reference: per bk x bn block, s = amax / 448 (UE8M0: 2^ceil(log2 s)), q = e4m3(x / s)."""
    k, n = x.shape
    q = np.zeros_like(x, dtype=ml_dtypes.float8_e4m3fn)
    s = np.zeros((-(-k // bk), -(-n // bn)), np.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = x[i * bk:(i + 1) * bk, j * bn:(j + 1) * bn]
            s[i, j] = np.abs(blk).max() / 448.0
            if ue8m0 and s[i, j] > 0:
                s[i, j] = 2.0 ** np.ceil(np.log2(np.float64(s[i, j])))
            q[i * bk:(i + 1) * bk, j * bn:(j + 1) * bn] = (blk / (s[i, j] if s[i, j] > 0 else 1.0)).astype(q.dtype)
    return q, s


def np_dequantize(q, s, bk, bn):
    full = np.repeat(np.repeat(s.astype(np.float64), bk, 0), bn, 1)[:q.shape[0], :q.shape[1]]
    return q.astype(np.float64) * full


def np_block_gemm(a_q, a_s, b_q, b_s):
    """sum over 128-wide K blocks of (A_kb B_kb) * a_s[:, kb] * b_s[kb] (b_s per column or per 128 columns)."""
    a, b = a_q.astype(np.float64), b_q.astype(np.float64)
    n = b.shape[1]
    cols = b_s if b_s.shape[1] == n else np.repeat(b_s, 128, axis=1)[:, :n]
    out = np.zeros((a.shape[0], n))
    for kb in range(a_s.shape[1]):
        part = a[:, kb * 128:(kb + 1) * 128] @ b[kb * 128:(kb + 1) * 128]
        out += part * a_s[:, kb, None] * cols[kb][None]
    return out


def rel(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


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
    back = np.asarray(fp8.dequantize_activations(q, s))
    np.testing.assert_allclose(back.reshape(15, 300), np_dequantize(want_q.astype(np.float32), want_s, 1, 128),
                               rtol=1e-6)


def test_partial_tiles_are_padded_not_cropped():
    """K = 130: the last tile holds 2 values; its scale is theirs and both survive the round trip."""
    x = np.ones((2, 130), np.float32)
    x[:, 128:] = [[3.0, -0.5], [0.25, 7.0]]
    q, s = fp8.quantize_activations(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(s), [[1 / 448, 3 / 448], [1 / 448, 7 / 448]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fp8.dequantize_activations(q, s)), x, rtol=2**-4)


def test_zero_tiles_give_zeros_not_nan():
    x = jnp.zeros((4, 256)).at[0, :3].set(1.0)
    for fmt in fp8.SCALE_FMTS:
        q, s = fp8.quantize_activations(x, scale_fmt=fmt)
        assert not np.isnan(np.asarray(q, np.float32)).any() and float(s[1, 0]) == 0.0
        np.testing.assert_array_equal(np.asarray(fp8.dequantize_activations(q, s))[1:], 0.0)
    w = jnp.zeros((256, 256)).at[:128, :128].set(2.0)
    qw, sw = fp8.quantize_weights(w)
    back = np.asarray(fp8.dequantize_weights(qw, sw))
    assert not np.isnan(back).any()
    np.testing.assert_array_equal(back, np.asarray(w))
    y = fp8.fp8_matmul(jnp.zeros((3, 200)), jnp.zeros((200, 50)))
    np.testing.assert_array_equal(np.asarray(y), 0.0)


def test_ue8m0_scales_are_powers_of_two():
    rng = np.random.default_rng(2)
    x = (rng.standard_t(3, size=(64, 384)) * 10.0 ** rng.integers(-3, 4, size=(64, 1))).astype(np.float32)
    x[5, :128] = 0.0
    q, s = fp8.quantize_activations(jnp.asarray(x), scale_fmt="ue8m0")
    want_q, want_s = np_quantize_tiles(x, 1, 128, ue8m0=True)
    s = np.asarray(s)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(np.asarray(q).astype(np.float32), want_q.astype(np.float32))
    live = s > 0
    assert np.all(np.log2(s[live]) == np.round(np.log2(s[live])))
    amax = np.abs(x).reshape(64, 3, 128).max(-1) / 448
    assert np.all((s[live] >= amax[live]) & (s[live] < 2 * amax[live]))
    with pytest.raises(ValueError, match="scale_fmt='e5m2'"):
        fp8.quantize_activations(jnp.asarray(x), scale_fmt="e5m2")


@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_fprop_dgrad_wgrad_match_numpy_blockwise_reference(scale_fmt):
    """Each GEMM of fp8_matmul's VJP equals the float64 block-wise sum over its own quantized operands:
    Fprop x(1x128) W(128x128), Dgrad dy(1x128) W^T(128x128), Wgrad x^T(128x1) dy(128x1) with x re-tiled from
    its saved FP8 copy. M = 200 tokens (a partial 128-token tile), K = 300, N = 260 (partial blocks)."""
    rng = np.random.default_rng(3)
    ue8m0 = scale_fmt == "ue8m0"
    x = (rng.normal(size=(200, 300)) * rng.lognormal(0, 1.5, size=300)).astype(np.float32)  # outlier channels
    w = (rng.normal(size=(300, 260)) * 0.05).astype(np.float32)
    dy = rng.normal(size=(200, 260)).astype(np.float32)
    y, vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(a, b, scale_fmt=scale_fmt, impl="xla"), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))

    xq, xs = np_quantize_tiles(x, 1, 128, ue8m0)
    wq, ws = np_quantize_tiles(w, 128, 128, ue8m0)
    dyq, dys = np_quantize_tiles(dy, 1, 128, ue8m0)
    x_saved = np_dequantize(xq, xs, 1, 128).astype(np.float32)
    aq, a_s = np_quantize_tiles(x_saved.T, 1, 128, ue8m0)  # x^T [K, M] in 128x1 tiles along the tokens
    bq, b_s = np_quantize_tiles(dy.T, 1, 128, ue8m0)
    want = {"fprop": np_block_gemm(xq, xs, wq, ws), "dgrad": np_block_gemm(dyq, dys, wq.T, ws.T),
            "wgrad": np_block_gemm(aq, a_s, bq.T, b_s.T)}
    for name, got in (("fprop", y), ("dgrad", dx), ("wgrad", dw)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want[name], rtol=1e-5, atol=1e-5 * np.abs(want[name]).max(),
                                   err_msg=name)


def test_gradients_match_exact_within_fp8_error():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 96, 256)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(256, 192)) * 0.05, jnp.float32)
    probe = jnp.asarray(rng.normal(size=(2, 96, 192)), jnp.float32)

    def loss(matmul, x, w):
        return jnp.sum(jnp.tanh(matmul(x, w)) * probe)

    exact = jax.grad(loss, argnums=(1, 2))(jnp.matmul, x, w)
    got = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(fp8.fp8_matmul, x, w)
    for g, e in zip(got, exact, strict=True):
        err = rel(g, np.asarray(e, np.float64))
        assert 1e-3 < err < 0.06, err  # really FP8 (e4m3: 3 mantissa bits), and within its error


def test_backward_saves_fp8_codes_not_the_activation():
    """The VJP's residuals are x's E4M3 codes and 1x128 scales (V3 sec. 3.3.3) and W's blocks: 1 + 4/128 bytes per
    activation instead of 4 (float32) or 2 (bf16)."""
    m, k, n = 512, 256, 384
    x, w = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    _, vjp = jax.vjp(fp8.fp8_matmul, x, w)
    saved = jax.tree_util.tree_leaves(vjp)
    assert not any(a.shape == x.shape and a.dtype != fp8.E4M3 for a in saved)
    assert sum(a.nbytes for a in saved) == m * k + m * (k // 128) * 4 + k * n + (k // 128) * (n // 128) * 4
    _, plain = jax.vjp(jnp.matmul, x, w)
    assert sum(a.nbytes for a in jax.tree_util.tree_leaves(plain)) == 4 * (m * k + k * n)


def test_checkpoint_codes_are_used_as_they_are():
    """w_scale given: w is E4M3 codes; only x gets a gradient, and it is the Dgrad GEMM over those codes."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(40, 200)), jnp.float32)
    wq, ws = fp8.quantize_weights(jnp.asarray(rng.normal(size=(200, 70)), jnp.float32))
    y, vjp = jax.vjp(lambda a: fp8.fp8_matmul(a, wq, ws), x)
    requantized = np.asarray(fp8.fp8_matmul(x, fp8.dequantize_weights(wq, ws)))  # the same codes again
    np.testing.assert_allclose(np.asarray(y), requantized, rtol=1e-5, atol=1e-5 * np.abs(requantized).max())
    (dx,) = vjp(jnp.ones_like(y))
    assert dx.shape == x.shape and bool(jnp.all(jnp.isfinite(dx)))


def test_bad_operands_are_named():
    with pytest.raises(ValueError, match=r"x \(4, 10\) \[\.\.\., K\] and w \(12, 3\)"):
        fp8.fp8_matmul(jnp.ones((4, 10)), jnp.ones((12, 3)))
    with pytest.raises(ValueError, match="fp8_gemm='cuda': choose auto or one of pallas, xla"):
        fp8.fp8_matmul(jnp.ones((4, 10)), jnp.ones((10, 3)), impl="cuda")


def test_config_fp8_fields_are_validated():
    assert ModelConfig().fp8 is False and ModelConfig(fp8=True, fp8_scale_fmt="ue8m0").fp8
    with pytest.raises(ConfigError, match="fp8='yes'"):
        ModelConfig(fp8="yes")
    with pytest.raises(ConfigError, match=r"fp8_scale_fmt='e5m2'.*fp32 or ue8m0"):
        ModelConfig(fp8_scale_fmt="e5m2")
    assert "fp8" not in ModelConfig(fp8=True).to_hf()


def test_lowers_for_tpu_with_fp8_dot_generals():
    """On TPU the XLA path: E4M3 operands straight into dot_general with FP32 results (TPU7x has an FP8 MXU; v5p
    and v6e run them at their bf16 rate), for all three GEMMs."""
    x, w = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((1024, 768), jnp.float32)
    grad = jax.value_and_grad(lambda x, w: jnp.sum(fp8.fp8_matmul(x, w).astype(jnp.float32) ** 2), argnums=(0, 1))
    text = jax.jit(grad).trace(x, w).lower(lowering_platforms=("tpu",)).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 3 and all("f8E4M3FN>" in d and "xf32>" in d.split("->")[-1] for d in dots), dots
