"""Pallas kernels: FP8 block-scaled GEMM, MLA decode attention, FlashAttention for training and prefill."""

from __future__ import annotations

import functools
from collections.abc import Callable

from jax import lax


def by_platform(body: Callable, interpret: bool | None, *args):
    """body(*args, family=..., interpret=...) for the platform being lowered for, which need not be this machine's
    (an AOT compile for TPU from a CPU host): the Mosaic body on TPU, the Triton body on GPU, and elsewhere (CPU)
    the Triton body interpreted. An explicit `interpret` wins."""
    def pick(family: str, default: bool) -> Callable:
        return functools.partial(body, family=family, interpret=default if interpret is None else interpret)

    return lax.platform_dependent(*args, tpu=pick("tpu", False), cuda=pick("gpu", False), rocm=pick("gpu", False),
                                  default=pick("gpu", True))
