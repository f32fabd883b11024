"""kernels_pallas.mla_decode: both kernel bodies (Triton-style and TPU-style, in interpret mode) against a float64
reference of the formula, and the lowering for CUDA (Triton) and TPU (Mosaic) from this CPU-only machine."""

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

from kernels_pallas.mla_decode import _default_splits, _mla_decode, mla_decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(q, qr, kv, kr, lengths, scale):
    """out[b, t, h] = softmax_s((q . kv[s] + q_rope . k_rope[s]) * scale) kv, query t of T seeing
    s < lengths[b] - (T - 1 - t); zeros where nothing is visible. float64."""
    q, qr, kv, kr = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, qr, kv, kr))
    four = q.ndim == 4
    q, qr = (q, qr) if four else (q[:, None], qr[:, None])
    out = np.zeros(q.shape)
    for b, t in np.ndindex(q.shape[:2]):
        n = int(lengths[b]) - (q.shape[1] - 1 - t)
        if n > 0:
            s = (q[b, t] @ kv[b, :n].T + qr[b, t] @ kr[b, :n].T) * scale
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, t] = (p / p.sum(axis=1, keepdims=True)) @ kv[b, :n]
    return out if four else out[:, 0]


def make(batch=3, length=72, heads=6, latent=32, rope=8, queries=None, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q_shape = (batch, heads) if queries is None else (batch, queries, heads)
    shapes = [(*q_shape, latent), (*q_shape, rope), (batch, length, latent), (batch, length, rope)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


# L = 72 is not a multiple of block_kv = 16; lengths: 1, 37 (not a multiple either), L
LENGTHS = np.array([1, 37, 72], np.int32)


@pytest.mark.parametrize("family", ["gpu", "tpu"])
@pytest.mark.parametrize("queries", [None, 3])
@pytest.mark.parametrize("splits", [1, 2])
def test_matches_float64_reference(family, queries, splits):
    args = make(queries=queries)
    out = _mla_decode(*args, jnp.asarray(LENGTHS), 0.3, True, block_kv=16, num_splits=splits, family=family)
    assert out.shape == args[0].shape and out.dtype == jnp.float32
    want = reference(*args, LENGTHS, 0.3)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
    if queries == 3:  # length 1: the first two queries see no key at all
        assert np.all(np.asarray(out)[0, :2] == 0)


@pytest.mark.parametrize("family", ["gpu", "tpu"])
def test_bfloat16_cache(family):
    args = make(queries=2, latent=64, rope=16, dtype=jnp.bfloat16, seed=1)
    out = _mla_decode(*args, jnp.asarray(LENGTHS), 0.2, True, block_kv=32, num_splits=2, family=family)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), reference(*args, LENGTHS, 0.2), atol=3e-2, rtol=3e-2)


def test_public_entry_defaults_zero_length_and_jit():
    """Default block_kv / num_splits, interpret chosen from the backend, L = 200 padded to the block, under jit."""
    args = make(length=200, heads=4, latent=32, rope=16, seed=2)
    lengths = np.array([0, 130, 200], np.int32)
    out = jax.jit(functools.partial(mla_decode, softmax_scale=0.25))(*args, jnp.asarray(lengths))
    out = np.asarray(out)
    assert np.all(np.isfinite(out)) and np.all(out[0] == 0)
    np.testing.assert_allclose(out, reference(*args, lengths, 0.25), atol=2e-5, rtol=2e-5)


def test_all_rows_empty_gives_zeros_with_splits():
    args = make(length=64, queries=2, seed=3)
    for family in ("gpu", "tpu"):
        out = _mla_decode(*args, jnp.zeros(3, jnp.int32), 1.0, True, block_kv=16, num_splits=4, family=family)
        assert np.all(np.asarray(out) == 0)


def test_default_splits_fill_the_gpu_only_for_long_contexts():
    # batch 1, 4 head blocks at L = 16384: 66 splits would make 2 x 132 programs; capped at 4 blocks each
    assert _default_splits(programs=4, blocks=16384 // 64, family="gpu") == 64
    assert _default_splits(programs=64, blocks=4096 // 64, family="gpu") == 5  # batch 16
    assert _default_splits(programs=512, blocks=4096 // 64, family="gpu") == 1  # batch 128 already fills it
    assert _default_splits(programs=4, blocks=3, family="gpu") == 1  # a short cache is not split
    assert _default_splits(programs=1, blocks=64, family="tpu") == 4


def v3_lowered_text(platform: str, queries: int) -> str:
    """StableHLO of mla_decode at DeepSeek-V3 decode shapes (128 heads, C=512, R=64, bf16), compiled kernel."""
    batch, length = 8, 4096
    q_shape = (batch, 128) if queries == 1 else (batch, queries, 128)
    shapes = [(*q_shape, 512), (*q_shape, 64), (batch, length, 512), (batch, length, 64)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes] + [jax.ShapeDtypeStruct((batch,), jnp.int32)]
    f = functools.partial(mla_decode, softmax_scale=0.1, interpret=False)
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("queries", [1, 2])
def test_lowers_for_cuda_as_a_triton_kernel(queries):
    try:
        text = v3_lowered_text("cuda", queries)
    except RuntimeError as e:  # jaxlib > 0.10.2 compiles the Triton module to PTX while lowering
        if "Triton compilation handler" in str(e):
            pytest.skip(f"this jaxlib needs the CUDA plugin to lower Triton kernels: {e}")
        raise
    assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text
    assert "tpu_custom_call" not in text


@pytest.mark.parametrize("queries", [1, 2])
def test_lowers_for_tpu_as_a_mosaic_kernel(queries):
    text = v3_lowered_text("tpu", queries)
    assert "tpu_custom_call" in text and "triton" not in text


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (extra [tpu])")
@pytest.mark.parametrize("precision", ["default", "highest"])  # the kernels set their own
@pytest.mark.parametrize("layout", [[], ["--paged"]])  # a row per sequence, or pages through a table
def test_compiles_for_v5p_at_v3_shapes(precision, layout):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "mla_decode_tpu_lowering.py"), *layout],
                         capture_output=True, text=True, timeout=600,
                         env=os.environ | {"JAX_DEFAULT_MATMUL_PRECISION": precision})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert [c["query"] for c in r["cases"]] == [[64, 128], [64, 2, 128]]
    assert all(c["tpu_custom_call"] and c["flops"] > 0 for c in r["cases"])


@pytest.mark.parametrize("family", ["gpu", "tpu"])
@pytest.mark.parametrize("queries", [None, 2])
def test_paged_reads_through_the_page_table_as_the_contiguous_cache(family, queries):
    """The same keys scattered over a shuffled pool of 16-token pages, plus pages nobody owns: through the page
    table the kernel gives what it gives on the contiguous cache, and the float64 reference."""
    page, max_pages, batch = 16, 5, 3
    q, qr, kv, kr = make(batch=batch, length=page * max_pages, queries=queries, seed=3)
    lengths = np.array([1, 37, 80], np.int32)
    rng = np.random.default_rng(0)
    owned = rng.permutation(20)[:batch * max_pages].reshape(batch, max_pages)  # 20 pages, 5 never used
    pool_kv = jnp.asarray(rng.standard_normal((20, page, kv.shape[-1])), jnp.float32)
    pool_kr = jnp.asarray(rng.standard_normal((20, page, kr.shape[-1])), jnp.float32)
    pool_kv = pool_kv.at[owned].set(kv.reshape(batch, max_pages, page, -1))
    pool_kr = pool_kr.at[owned].set(kr.reshape(batch, max_pages, page, -1))
    table = np.where(np.arange(max_pages) * page < lengths[:, None], owned, 20)  # pages past a length: "no page"
    paged = _mla_decode(q, qr, pool_kv, pool_kr, jnp.asarray(lengths), 0.3, True, family=family, num_splits=2,
                        table=jnp.asarray(np.minimum(table, 19)))
    contiguous = _mla_decode(q, qr, kv, kr, jnp.asarray(lengths), 0.3, True, block_kv=page, family=family,
                             num_splits=2)
    np.testing.assert_allclose(np.asarray(paged), np.asarray(contiguous), atol=1e-6)
    np.testing.assert_allclose(np.asarray(paged), reference(q, qr, kv, kr, lengths, 0.3), atol=2e-5, rtol=2e-5)
    public = mla_decode(q, qr, pool_kv, pool_kr, jnp.asarray(lengths), 0.3, page_table=jnp.asarray(table))
    np.testing.assert_allclose(np.asarray(public), np.asarray(paged), atol=1e-6)
