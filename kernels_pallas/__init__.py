"""Pallas kernels: FP8 block-scaled GEMM, MLA decode attention (dense and DSA-sparse), FlashAttention for training
and prefill; and what their bodies share: the platform dispatch, dots with their own precision, the online softmax."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

# lax.platform_dependent branch -> (kernel body family, interpret): Mosaic on TPU, Triton on GPUs, else interpreted.
# The one table of its kind here; deepseek_jax.backend resolves the model's "auto" settings.
KERNEL_BODIES = {"tpu": ("tpu", False), "cuda": ("gpu", False), "rocm": ("gpu", False), "default": ("gpu", True)}
NEG = -1e30  # a finite -inf for running maxima: a row that sees nothing keeps l = 0 and gives zeros, never NaN


def by_platform(body: Callable, interpret: bool | None, *args):
    """body(*args, family=..., interpret=...) for the platform being lowered for, which need not be this machine's
    (an AOT compile for TPU from a CPU host): the Mosaic body on TPU, the Triton body on GPU, and elsewhere (CPU)
    the Triton body interpreted. An explicit `interpret` wins."""
    def pick(family: str, default: bool) -> Callable:
        return functools.partial(body, family=family, interpret=default if interpret is None else interpret)

    return lax.platform_dependent(*args, **{where: pick(*how) for where, how in KERNEL_BODIES.items()})


def dot(a: jax.Array, b: jax.Array, ca: int = 1, cb: int = 1) -> jax.Array:
    """a . b (2-D) contracting a's axis ca with b's axis cb, accumulated in f32. The precision is the kernel's own,
    not jax_default_matmul_precision's: full f32 for f32 operands, the native MXU / tensor-core product otherwise
    (Mosaic rejects an fp32 contract precision on bf16 or fp8 operands)."""
    f32 = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST if f32 else lax.Precision.DEFAULT)


def online_softmax(carry: tuple, s: jax.Array, visible: jax.Array, v: jax.Array) -> tuple:
    """Fold one block of scores s [rows, n] (where `visible`) and values v [n, d] into the running (m, l, acc) of
    flash attention: m' = max(m, rowmax s), l' = e^(m - m') l + rowsum p, acc' = e^(m - m') acc + p v, with
    p = e^(s - m') in v's dtype for the product."""
    m, lsum, acc = carry
    m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, NEG), axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    return m_new, alpha * lsum + jnp.sum(p, axis=1, keepdims=True), alpha * acc + dot(p.astype(v.dtype), v, 1, 0)


def online_init(rows: int, width: int) -> tuple:
    return jnp.full((rows, 1), NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32), jnp.zeros((rows, width),
                                                                                               jnp.float32)


def online_finish(m: jax.Array, lsum: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The normalised output acc / l and the log-sum-exp m + log l (NEG where nothing was seen: zeros out)."""
    seen = lsum > 0
    safe = jnp.where(seen, lsum, 1.0)
    return acc / safe, jnp.where(seen, m + jnp.log(safe), NEG)
