"""kernels_pallas.fp8_gemm: the block-scaled FP8 GEMM kernel (interpret mode) against a float64 numpy reference and
the XLA path, dense and grouped, with M, N, K off the tiles; its operand checks; its lowering for CUDA (Triton)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from test_fp8 import np_block_gemm

from deepseek_jax import fp8
from deepseek_jax.layers import gmm
from kernels_pallas import fp8_gemm as kernel


def operands(m, k, n, groups=None, per_column=False, seed=0):
    rng = np.random.default_rng(seed)
    lead = () if groups is None else (groups,)
    kb, nb = -(-k // 128), -(-n // 128)
    a_q = jnp.asarray(rng.normal(size=(m, k)) * 40, jnp.float8_e4m3fn)
    a_s = jnp.asarray(rng.uniform(0.01, 1, size=(m, kb)), jnp.float32)
    b_q = jnp.asarray(rng.normal(size=(*lead, k, n)) * 40, jnp.float8_e4m3fn)
    b_s = jnp.asarray(rng.uniform(0.01, 1, size=(*lead, kb, n if per_column else nb)), jnp.float32)
    return a_q, a_s, b_q, b_s


def np_grouped(a_q, a_s, b_q, b_s, sizes):
    a_q, a_s, b_q, b_s = (np.asarray(x, np.float32) for x in (a_q, a_s, b_q, b_s))
    out, start = np.zeros((a_q.shape[0], b_q.shape[-1])), 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        out[rows] = np_block_gemm(a_q[rows], a_s[rows], b_q[g], b_s[g])
        start += size
    return out


@pytest.mark.parametrize("m,k,n,per_column", [(100, 300, 200, False), (64, 256, 128, True), (1, 130, 20, False)])
def test_dense_matches_numpy_and_xla(m, k, n, per_column):
    args = operands(m, k, n, per_column=per_column)
    want = np_block_gemm(*(np.asarray(x, np.float32) for x in args))
    got = kernel.fp8_gemm(*args, out_dtype=jnp.float32, interpret=True)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(fp8.gemm_xla(*args)), rtol=1e-6,
                               atol=1e-6 * np.abs(want).max())
    bf16 = kernel.fp8_gemm(*args, interpret=True)  # default out_dtype
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


# group boundaries inside row tiles (block_m 16), an empty group, and 7 trailing rows in no group
SIZES = [30, 0, 45, 18]


@pytest.mark.parametrize("per_column", [False, True])
def test_grouped_matches_numpy_and_xla(per_column):
    args = operands(100, 200, 150, groups=4, per_column=per_column, seed=1)
    sizes = jnp.asarray(SIZES, jnp.int32)
    want = np_grouped(*args, SIZES)
    got = kernel.fp8_gemm_grouped(*args, sizes, out_dtype=jnp.float32, interpret=True, block_m=16)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.all(np.asarray(got)[sum(SIZES):] == 0)
    for impl in ("tiled", "ragged", "pallas"):
        xla = gmm.fp8_grouped_gemm(*args, sizes, impl=impl)
        np.testing.assert_allclose(np.asarray(xla), np.asarray(got), rtol=1e-6, atol=1e-6 * np.abs(want).max(),
                                   err_msg=impl)


def test_group_metadata_visits_straddled_tiles_once_per_group():
    gid, tile, lo, hi = (np.asarray(x) for x in kernel.group_metadata(jnp.asarray([5, 0, 12, 3], jnp.int32), 32, 8))
    # rows: group 0 [0, 5) tile 0; group 2 [5, 17) tiles 0-2; group 3 [17, 20) tile 2; 4 + 4 - 1 = 7 items
    np.testing.assert_array_equal(gid, [0, 2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(tile, [0, 0, 1, 2, 2, 2, 2])  # idle items repeat the last tile
    np.testing.assert_array_equal(lo, [0, 5, 5, 5, 17, 0, 0])
    np.testing.assert_array_equal(hi, [5, 17, 17, 17, 20, 0, 0])


@pytest.mark.parametrize("grouped", [False, True])
def test_fp8_matmul_gradients_pallas_equal_xla(grouped):
    """fp8_matmul / fp8_grouped_matmul take the kernel on GPUs and XLA elsewhere: both give the same gradients."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(100, 160)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(100, 72)), jnp.float32)
    if grouped:
        w = jnp.asarray(rng.normal(size=(4, 160, 72)) * 0.05, jnp.float32)
        sizes = jnp.asarray(SIZES, jnp.int32)
        matmul = lambda impl: functools.partial(gmm.fp8_grouped_matmul, group_sizes=sizes, impl=impl)
        impls = ("pallas", "tiled")
    else:
        w = jnp.asarray(rng.normal(size=(160, 72)) * 0.05, jnp.float32)
        matmul = lambda impl: functools.partial(fp8.fp8_matmul, impl=impl)
        impls = ("pallas", "xla")

    def grads(impl):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(matmul(impl)(x, w) * probe), argnums=(0, 1)))(x, w)

    for a, b in zip(*map(grads, impls), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


def test_bad_operands_are_named():
    a_q, a_s, b_q, b_s = operands(8, 256, 128)
    cases = [
        ((a_q[None], a_s, b_q, b_s), r"a_q must be 2-D \[M, K\], got shape \(1, 8, 256\)"),
        ((a_q, a_s, b_q[:200], b_s), r"K mismatch.*K=256.*K=200"),
        ((a_q, a_s[:, :1], b_q, b_s), r"a_s has shape \(8, 1\).*needs \(8, 2\)"),
        ((a_q, a_s, b_q, b_s[:, :, None]), r"b_s has shape \(2, 1, 1\).*needs \(2, 1\).*or \(2, 128\)"),
        ((a_q.astype(jnp.bfloat16), a_s, b_q, b_s), "a_q must hold FP8 codes.*bfloat16"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            kernel.fp8_gemm(*args, interpret=True)
    with pytest.raises(ValueError, match=r"b_q must be \[G=3, K, N\]"):
        kernel.fp8_gemm_grouped(a_q, a_s, b_q, b_s, jnp.ones(3, jnp.int32), interpret=True)
    with pytest.raises(ValueError, match=r"group_sizes must be \[G\] integers"):
        kernel.fp8_gemm_grouped(a_q, a_s, b_q[None], b_s[None], jnp.ones(1, jnp.float32), interpret=True)


def lower_for_cuda(f, *shapes):
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    try:
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:  # jaxlib > 0.10.2 compiles the Triton module to PTX while lowering
        if "Triton compilation handler" in str(e):
            pytest.skip(f"this jaxlib needs the CUDA plugin to lower Triton kernels: {e}")
        raise


@pytest.mark.parametrize("grouped", [False, True])
def test_lowers_for_cuda_as_a_triton_kernel_with_fp8_dots(grouped, monkeypatch, capsys):
    """DeepSeek-V3 shapes (M 4096, K 7168, N 2112; 8 experts): one Triton custom call whose K loop is an FP8 x FP8
    tensor-core dot into FP32 (the Triton module, printed by pallas_call(debug=True))."""
    real = pl.pallas_call
    monkeypatch.setattr(kernel.pl, "pallas_call", lambda *a, **kw: real(*a, **kw | {"debug": True}))
    f8, f32 = jnp.float8_e4m3fn, jnp.float32
    m, k, n, g = 4096, 7168, 2112, 8
    if grouped:
        text = lower_for_cuda(functools.partial(kernel.fp8_gemm_grouped, interpret=False), ((m, k), f8), ((m, 56), f32),
                              ((g, k, n), f8), ((g, 56, 17), f32), ((g,), jnp.int32))
    else:
        text = lower_for_cuda(functools.partial(kernel.fp8_gemm, interpret=False), ((m, k), f8), ((m, 56), f32),
                              ((k, n), f8), ((56, 17), f32))
    assert text.count("__gpu$xla.gpu.triton") == 1 and "tpu_custom_call" not in text
    module = capsys.readouterr().out
    dots = [line for line in module.splitlines() if "tt.dot " in line]
    assert len(dots) == 1 and re.search(r"tensor<\d+x128xf8E4M3FN> \* tensor<128x128xf8E4M3FN> -> tensor<\d+x128xf32>",
                                        dots[0]), dots
