"""kernels_pallas.flash_attention: both kernel bodies (Triton-style and Mosaic-style, in interpret mode) against a
float64 reference of the masking rule and against jax.grad of the plain XLA path; the causal block skipping; the
lowering for CUDA (Triton) and TPU (Mosaic) from this CPU-only machine, forward and backward."""

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

from kernels_pallas import flash_attention as fa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.3


def reference64(q, k, v, pos, q_seg, kv_seg, scale):
    """out[b, i, h] = softmax over the keys j <= pos[b, i] with kv_seg[b, j] == q_seg[b, i] of scale q.k_j, times
    v_j; zeros where no key is visible. float64."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    out = np.zeros((*q.shape[:3], v.shape[-1]))
    for b, i in np.ndindex(q.shape[:2]):
        keys = np.flatnonzero((np.arange(k.shape[1]) <= pos[b, i]) & (kv_seg[b] == q_seg[b, i]))
        if keys.size:
            s = np.einsum("hd,jhd->hj", q[b, i], k[b, keys]) * scale
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, i] = np.einsum("hj,jhd->hd", p / p.sum(axis=1, keepdims=True), v[b, keys])
    return out


def make(case: str, dtype=jnp.float32, heads=2, dqk=48, dv=32, seed=0):
    """(q, k, v, q_positions, q_segment_ids, kv_segment_ids) as numpy-friendly jax arrays.

    train: t = s = 72 (not a multiple of the blocks), row 0 packs documents 1, 2 and padding (segment 0), row 1
    documents 1, 2, 3. prefill: 40 queries against 100 keys; row 0 the cache's last 40 slots over documents 1, 2;
    row 1 slots 0..39 (later keys unused) with query 5 in a segment no key has: it sees nothing."""
    rng = np.random.default_rng(seed)
    if case == "train":
        t = s = 72
        pos = np.broadcast_to(np.arange(t), (2, t))
        q_seg = np.stack([np.repeat([1, 2, 0], [30, 25, 17]), np.repeat([1, 2, 3], [10, 20, 42])])
        kv_seg = q_seg
    else:
        t, s = 40, 100
        pos = np.stack([s - t + np.arange(t), np.arange(t)])
        kv_seg = np.stack([np.repeat([1, 2], [70, 30]), np.ones(s, int)])
        q_seg = np.stack([np.full(t, 2), np.ones(t, int)])
        q_seg[1, 5] = 7
    arrays = [rng.standard_normal(shape) for shape in ((2, t, heads, dqk), (2, s, heads, dqk), (2, s, heads, dv))]
    return ([jnp.asarray(x, dtype) for x in arrays]
            + [jnp.asarray(np.ascontiguousarray(x), jnp.int32) for x in (pos, q_seg, kv_seg)])


def run(args, family: str, blocks=(16, 32), cotangent_seed=1):
    """The family's forward and backward in interpret mode: (o, (dq, dk, dv)) for a random cotangent."""
    opts = fa._Options(SCALE, *blocks, True)
    o, lse = fa._forward(*args, opts=opts, family=family)
    do = jnp.asarray(np.random.default_rng(cotangent_seed).standard_normal(o.shape), o.dtype)
    return o, do, fa._backward(*args, o, lse, do, opts=opts, family=family)


@jax.jit
def xla_grads(args, do):
    _, vjp = jax.vjp(lambda q, k, v: fa.reference(q, k, v, *args[3:], SCALE), *args[:3])
    return vjp(do)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("family", ["gpu", "tpu"])
@pytest.mark.parametrize("case", ["train", "prefill"])
def test_matches_float64_reference_and_xla_gradients(family, case):
    args = make(case)
    o, do, grads = run(args, family)
    assert o.shape == (*args[0].shape[:3], args[2].shape[-1]) and o.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o), reference64(*args, SCALE), atol=2e-5, rtol=2e-5)
    if case == "prefill":  # row 1, query 5 sees nothing
        assert np.all(np.asarray(o)[1, 5] == 0) and np.all(np.asarray(grads[0])[1, 5] == 0)
    for name, got, want in zip(("dq", "dk", "dv"), grads, xla_grads(args, do), strict=True):
        assert got.shape == want.shape and rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("family", ["gpu", "tpu"])
def test_bfloat16(family):
    args = make("train", jnp.bfloat16, dqk=64, seed=2)
    o, do, grads = run(args, family, blocks=(32, 32))
    assert o.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(np.asarray(o, np.float32), reference64(*args, SCALE), atol=3e-2, rtol=3e-2)
    f32 = [x.astype(jnp.float32) for x in args[:3]] + args[3:]
    for name, got, want in zip(("dq", "dk", "dv"), grads, xla_grads(f32, do.astype(jnp.float32)), strict=True):
        assert rel_err(got, want) < 3e-2, name


def test_public_entry_jit_grad_and_integer_cotangents():
    """Default blocks, interpret chosen from the backend, under jit and jax.grad through the custom VJP."""
    args = make("prefill", seed=3)
    f = functools.partial(fa.flash_attention, scale=SCALE)
    loss = lambda q, k, v, *rest, fn: jnp.sum(jnp.sin(fn(q, k, v, *rest)))
    got, want = (jax.jit(jax.value_and_grad(functools.partial(loss, fn=fn), argnums=(0, 1, 2)))(*args)
                 for fn in (f, functools.partial(fa.reference, scale=SCALE)))
    assert abs(float(got[0]) - float(want[0])) < 1e-4
    for g, w in zip(got[1], want[1], strict=True):
        assert rel_err(g, w) < 1e-5
    grad_pos = jax.grad(lambda q, pos: jnp.sum(f(q, *args[1:3], pos, *args[4:])), argnums=(0, 1), allow_int=True)
    assert jax.eval_shape(grad_pos, args[0], args[3])[1].dtype == jax.dtypes.float0


def test_block_ranges_skip_the_causal_upper_triangle():
    t = 4096
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    kv_end, q_start = fa.block_ranges(pos, 512, 512, t // 512)
    np.testing.assert_array_equal(kv_end, np.tile(np.arange(1, 9), (2, 1)))
    np.testing.assert_array_equal(q_start, np.tile(np.arange(8), (2, 1)))
    kv_end, _ = fa.block_ranges(pos, 128, 128, t // 128)
    assert int(kv_end.sum()) == 2 * 32 * 33 // 2  # 528 of 1024 block pairs per row: about half
    # prefill: 1024 queries at slots 3072..4095; a block of padded queries (-1) runs nothing
    pos = jnp.concatenate([3072 + jnp.arange(1024, dtype=jnp.int32), jnp.full(512, -1, jnp.int32)])[None]
    kv_end, q_start = fa.block_ranges(pos, 512, 512, 8)
    np.testing.assert_array_equal(kv_end, [[7, 8, 0]])
    np.testing.assert_array_equal(q_start, [[0] * 7 + [1]])
    _, q_start = fa.block_ranges(jnp.full((1, 512), -1, jnp.int32), 512, 512, 2)
    np.testing.assert_array_equal(q_start, [[1, 1]])  # no query block: the key blocks' loops are empty


@pytest.mark.parametrize("family", ["gpu", "tpu"])
def test_skipped_blocks_are_never_read(family):
    """Keys in blocks past every query block's range hold NaN: one read of them (even masked: 0 * NaN) would
    poison the output or the gradients."""
    q, k, v, _, q_seg, _ = make("prefill", seed=4)  # t = 40 against s = 100
    pos = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))  # key blocks of 16: 48.. never run
    kv_seg = jnp.ones((2, 100), jnp.int32)
    poison = (jnp.arange(100) >= 48)[None, :, None, None]
    args = [q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v), pos, q_seg, kv_seg]
    o, do, (dq, dk, dv) = run(args, family, blocks=(16, 16))
    clean = [q, jnp.where(poison, 0.0, k), jnp.where(poison, 0.0, v), pos, q_seg, kv_seg]
    np.testing.assert_allclose(np.asarray(o), reference64(*clean, SCALE), atol=2e-5, rtol=2e-5)
    for got, want in zip((dq, dk, dv), xla_grads(clean, do), strict=True):
        assert np.all(np.isfinite(np.asarray(got))) and rel_err(got, want) < 1e-5


def test_rejects_mismatched_shapes():
    q, k, v, pos, q_seg, kv_seg = make("train")
    with pytest.raises(ValueError, match="kv_segment_ids has shape"):
        fa.flash_attention(q, k, v, pos, q_seg, kv_seg[:, :-1], SCALE)
    with pytest.raises(ValueError, match="want q"):
        fa.flash_attention(q[0], k, v, pos, q_seg, kv_seg, SCALE)
    with pytest.raises(ValueError, match="block_q=24"):
        fa._prepare(q, k, v, pos, q_seg, kv_seg, fa._Options(SCALE, 24, 64, False), "gpu")


def v3_lowered_text(platform: str, grad: bool) -> str:
    """StableHLO of flash_attention (or of its gradient) at MLA training shapes: t = s = 4096, 16 heads (128 in
    V3: lowering only traces), dqk = 192 (128 nope + 64 rope), dv = 128, bf16, compiled kernels."""
    b, t, h = 1, 4096, 16
    args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16) for d in (192, 192, 128)]
    args += [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 3
    attn = functools.partial(fa.flash_attention, scale=192**-0.5, interpret=False)
    f = jax.grad(lambda q, k, v, *rest: jnp.sum(attn(q, k, v, *rest).astype(jnp.float32)), argnums=(0, 1, 2))
    return jax.jit(f if grad else attn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("grad", [False, True])
def test_lowers_for_cuda_as_triton_kernels(grad):
    try:
        text = v3_lowered_text("cuda", grad)
    except RuntimeError as e:  # jaxlib > 0.10.2 compiles the Triton module to PTX while lowering
        if "Triton compilation handler" in str(e):
            pytest.skip(f"this jaxlib needs the CUDA plugin to lower Triton kernels: {e}")
        raise
    calls = text.count("__gpu$xla.gpu.triton") or text.count("triton_kernel_call")
    assert calls == (3 if grad else 1) and "tpu_custom_call" not in text  # forward; + dK/dV and dQ


@pytest.mark.parametrize("grad", [False, True])
def test_lowers_for_tpu_as_mosaic_kernels(grad):
    text = v3_lowered_text("tpu", grad)
    assert text.count("tpu_custom_call") == (3 if grad else 1) and "triton" not in text


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (extra [tpu])")
@pytest.mark.parametrize("precision", ["default", "highest"])  # the kernels set their own
def test_compiles_for_v5p_at_v3_shapes(precision):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "flash_attention.py"), "--tpu_aot"],
                         capture_output=True, text=True, timeout=600,
                         env=os.environ | {"JAX_DEFAULT_MATMUL_PRECISION": precision})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert [c["kernels"] for c in r["cases"]] == [1, 3] and all(c["flops"] > 0 for c in r["cases"])
