"""kernels_pallas.mla_sparse_decode: both bodies (Triton-style and TPU-style, interpreted) against a float64
reference of sparse absorbed-MLA attention over selected rows; per-row caches and a flat pool; lowering for CUDA
and TPU from this CPU machine."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.mla_sparse_decode import _sparse_decode, mla_sparse_decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(q, qr, kv, kr, indices, scale):
    """out[b, (t,) h] = softmax_j((q . kv[idx_j] + q_rope . k_rope[idx_j]) scale) kv[idx_j] over idx_j >= 0 of the
    row's cache (kv [B, L, C]) or of the pool (kv [N, C]); zeros without a valid index. float64."""
    q, qr, kv, kr = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, qr, kv, kr))
    four = q.ndim == 4
    q, qr, indices = (q, qr, indices) if four else (q[:, None], qr[:, None], indices[:, None])
    out = np.zeros(q.shape)
    for b, t in np.ndindex(q.shape[:2]):
        sel = [i for i in indices[b, t] if i >= 0]
        if sel:
            rows, rrows = (kv[b, sel], kr[b, sel]) if kv.ndim == 3 else (kv[sel], kr[sel])
            s = (q[b, t] @ rows.T + qr[b, t] @ rrows.T) * scale
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, t] = (p / p.sum(axis=1, keepdims=True)) @ rows
    return out if four else out[:, 0]


def make(batch=3, length=70, heads=6, latent=32, rope=16, queries=None, k=40, pool=False, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q_shape = (batch, heads) if queries is None else (batch, queries, heads)
    rows = (batch * length,) if pool else (batch, length)
    q, qr, kv, kr = (jnp.asarray(rng.standard_normal(s), dtype) for s in
                     [(*q_shape, latent), (*q_shape, rope), (*rows, latent), (*rows, rope)])
    i_shape = (*q_shape[:-1], k)
    n = batch * length if pool else length
    indices = np.stack([rng.permutation(n)[:k] for _ in range(int(np.prod(i_shape[:-1])))]).reshape(i_shape)
    flat = indices.reshape(-1, k)
    flat[0, :] = -1  # a query with nothing selected
    flat[1, 5:] = -1  # a short query: 5 keys
    flat[2, ::3] = -1  # invalid entries in between (moved last by the kernel)
    return q, qr, kv, kr, indices.astype(np.int32)


@pytest.mark.parametrize("family", ["gpu", "tpu"])
@pytest.mark.parametrize("queries", [None, 2])
@pytest.mark.parametrize("pool", [False, True])
def test_matches_float64_reference(family, queries, pool):
    q, qr, kv, kr, idx = make(queries=queries, pool=pool)
    out = _sparse_decode(q, qr, kv, kr, jnp.asarray(idx), 0.3, True, block_k=16, family=family)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), reference(q, qr, kv, kr, idx, 0.3), atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(out).reshape(-1, *q.shape[-2:])[0] == 0)


@pytest.mark.parametrize("family", ["gpu", "tpu"])
def test_bfloat16_cache(family):
    q, qr, kv, kr, idx = make(queries=2, latent=64, dtype=jnp.bfloat16, seed=1)
    out = _sparse_decode(q, qr, kv, kr, jnp.asarray(idx), 0.2, True, block_k=32, family=family)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(q, qr, kv, kr, idx, 0.2), atol=3e-2, rtol=3e-2)


def test_public_entry_under_jit_with_default_blocks():
    q, qr, kv, kr, idx = make(length=300, k=200, seed=2)
    out = jax.jit(functools.partial(mla_sparse_decode, softmax_scale=0.25))(q, qr, kv, kr, jnp.asarray(idx))
    np.testing.assert_allclose(np.asarray(out), reference(q, qr, kv, kr, idx, 0.25), atol=2e-5, rtol=2e-5)


def v32_lowered_text(platform: str, queries: int) -> str:
    """StableHLO at DeepSeek-V3.2 decode shapes (128 heads, C 512, R 64, top-k 2048, bf16), compiled kernel."""
    batch, length = 4, 8192
    q_shape = (batch, 128) if queries == 1 else (batch, queries, 128)
    shapes = [(*q_shape, 512), (*q_shape, 64), (batch, length, 512), (batch, length, 64)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    args.append(jax.ShapeDtypeStruct((*q_shape[:-1], 2048), jnp.int32))
    f = functools.partial(mla_sparse_decode, softmax_scale=0.1, interpret=False)
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("queries", [1, 2])
def test_lowers_for_cuda_as_a_triton_kernel(queries):
    try:
        text = v32_lowered_text("cuda", queries)
    except RuntimeError as e:  # jaxlib > 0.10.2 compiles the Triton module to PTX while lowering
        if "Triton compilation handler" in str(e):
            pytest.skip(f"this jaxlib needs the CUDA plugin to lower Triton kernels: {e}")
        raise
    assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text
    assert "tpu_custom_call" not in text


@pytest.mark.parametrize("queries", [1, 2])
def test_lowers_for_tpu_as_a_mosaic_kernel(queries):
    text = v32_lowered_text("tpu", queries)
    assert "tpu_custom_call" in text and "triton" not in text


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (extra [tpu])")
@pytest.mark.parametrize("precision", ["default", "highest"])  # the kernels set their own
def test_compiles_for_v5p_at_v32_shapes(precision):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "mla_decode_tpu_lowering.py"), "--sparse"],
                         capture_output=True, text=True, timeout=600,
                         env=os.environ | {"JAX_DEFAULT_MATMUL_PRECISION": precision})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(c["tpu_custom_call"] and c["flops"] > 0 for c in r["cases"])
