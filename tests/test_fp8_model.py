"""FP8 in the model (model.fp8=True, V3 sec. 3.3): which layers run in FP8, the FP8 experts' grouped GEMMs and
Wgrad against numpy, expert parallelism, FP8 checkpoint codes fed straight to the GEMM (training accuracy:
the FP8 notebook's test)."""

import os

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from conftest import FIXTURES, tiny_config
from jax._src.interpreters import partial_eval as pe
from test_fp8 import np_block_gemm, np_dequantize, np_quantize_tiles

import deepseek_jax as dsj
from deepseek_jax import sharding
from deepseek_jax.layers import gmm
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.moe import MoE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_linear_layers_and_experts_run_in_fp8_the_rest_stays_high_precision():
    """Every Linear of MLA, the dense MLPs and the shared experts is FP8; the router, the head and the MTP
    projection are not (nor embedding, norms and the attention core, which are not Linear layers)."""
    cfg = tiny_config(fp8=True)
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear):
            seen["/".join(context.module.path)] = context.module.fp8
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):  # traced only
        jax.eval_shape(dsj.DeepSeekV3(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    high = {p for p, f in seen.items() if f is None}
    assert high == {"head", "mtp_0/eh_proj", *(p for p in seen if p.endswith("router/gate"))}, high
    assert {f for p, f in seen.items() if p not in high} == {"fp32"}
    assert any(p.endswith("attn/o") for p in seen) and any(p.endswith("shared/down") for p in seen)


SIZES = [30, 0, 45, 18]  # an empty expert, and 7 rows past the last group


def test_fp8_experts_fprop_dgrad_wgrad_match_numpy():
    """Per expert: Fprop x(1x128) W_g(128x128), Dgrad dy(1x128) W_g^T, Wgrad over the expert's own rows in 128x1
    tiles (its rows padded to whole tiles, so no tile mixes experts)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(100, 200)) * rng.lognormal(0, 1, size=200)).astype(np.float32)
    w = (rng.normal(size=(4, 200, 150)) * 0.05).astype(np.float32)
    dy = rng.normal(size=(100, 150)).astype(np.float32)
    sizes = jnp.asarray(SIZES, jnp.int32)
    y, vjp = jax.vjp(lambda a, b: gmm.fp8_grouped_matmul(a, b, sizes), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(dy))
    want_y, want_dx, want_dw, start = np.zeros_like(y), np.zeros_like(dx), np.zeros_like(dw), 0
    for g, size in enumerate(SIZES):
        rows = slice(start, start + size)
        start += size
        wq, ws = np_quantize_tiles(w[g], 128, 128)
        if not size:
            continue
        xq, xs = np_quantize_tiles(x[rows], 1, 128)
        dyq, dys = np_quantize_tiles(dy[rows], 1, 128)
        want_y[rows] = np_block_gemm(xq, xs, wq, ws)
        want_dx[rows] = np_block_gemm(dyq, dys, wq.T, ws.T)
        aq, a_s = np_quantize_tiles(np_dequantize(xq, xs, 1, 128).astype(np.float32).T, 1, 128)
        bq, b_s = np_quantize_tiles(dy[rows].T, 1, 128)
        want_dw[g] = np_block_gemm(aq, a_s, bq.T, b_s.T)
    for name, got, want in (("fprop", y, want_y), ("dgrad", dx, want_dx), ("wgrad", dw, want_dw)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_fp8_experts_under_expert_parallelism_equal_single_device():
    """Each device's experts see the same rows, in the same order, as on one device, so the same FP8 tiles. (With a
    data axis too, each data shard's rows of an expert form their own 128x1 Wgrad tiles: equal only within FP8
    error, as Wgrad's partial sums over tokens are per device.)"""
    cfg = tiny_config(fp8=True)
    x = jax.random.normal(jax.random.key(0), (8, 12, cfg.hidden_size))
    params = nn.meta.unbox(MoE(cfg).init(jax.random.key(1), x)["params"])

    def loss(p, x):
        y, _ = MoE(cfg).apply({"params": p}, x, mutable=["router_stats"])
        return jnp.sum(jnp.sin(y)), y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, y0), g0 = grad(params, x)
    with jax.set_mesh(sharding.make_mesh({"expert": 8})):
        (_, y1), g1 = grad(params, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


def test_fp8_checkpoint_codes_feed_the_fp8_gemm():
    """keep_fp8=True with fp8=True: the E4M3 codes and weight_scale_inv blocks go into the FP8 GEMM as they are:
    no FP8 tensor is widened in the forward pass, and the logits equal those of re-quantizing the dequantized
    checkpoint (the same codes)."""
    path = os.path.join(FIXTURES, "v3_fp8")
    cfg, codes = dsj.load_hf_checkpoint(path, dtype=jnp.float32, keep_fp8=True, fp8=True)
    assert cfg.fp8 and codes["layers_1"]["mlp"]["experts"]["gate"].dtype == jnp.float8_e4m3fn
    tokens = jnp.asarray(np.load(os.path.join(path, "reference.npz"))["tokens"])
    jaxpr = jax.make_jaxpr(lambda p: dsj.DeepSeekV3(cfg).apply({"params": p}, tokens)[0])(codes).jaxpr
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True])  # what reaches the logits
    widened = [e for e in _eqns(jaxpr) if e.primitive.name == "convert_element_type"
               and e.invars[0].aval.dtype == jnp.float8_e4m3fn]
    assert not widened, widened[:3]
    fp8_dots = [e for e in _eqns(jaxpr) if e.primitive.name in ("dot_general", "ragged_dot_general")
                and e.invars[1].aval.dtype == jnp.float8_e4m3fn]
    assert len(fp8_dots) >= 8  # every FP8 linear layer and expert matmul of the 3 + 1 blocks
    _, dequantized = dsj.load_hf_checkpoint(path, dtype=jnp.float32, fp8=True)
    got, want = (np.asarray(dsj.logits(cfg, p, tokens)) for p in (codes, dequantized))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
