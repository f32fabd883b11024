"""Linear layers whose kernels carry logical axis names, for sharding by one rules table; optionally in FP8."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.fp8 import fp8_matmul, stored_scales, stored_weight


class Linear(nn.Module):
    """y = x . W, contracting the last `in_dims` axes of x with the first of W.

    kernel shape: x.shape[-in_dims:] + features, with logical names `axes` (one per kernel dim).
    fp8: a scale format ("fp32" or "ue8m0") runs y as fp8.fp8_matmul over the kernel as a matrix
    [prod(in dims), prod(features)] (V3 sec. 3.3), straight from the E4M3 codes and `kernel_scale_inv`
    blocks of an FP8 checkpoint when it has them; None computes in `dtype`.
    """

    features: int | Sequence[int]
    axes: Sequence[str | None]
    in_dims: int = 1
    dtype: jnp.dtype = jnp.float32
    init_std: float = 0.006
    fp8: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        shape = tuple(x.shape[x.ndim - self.in_dims:]) + feats
        if len(shape) != len(self.axes):
            raise ValueError(f"{self.name}: kernel shape {shape} needs {len(shape)} axis names, got {self.axes}")
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(self.init_std), tuple(self.axes)), shape, jnp.float32)
        if self.fp8:
            lead = x.shape[:x.ndim - self.in_dims]
            matrix = kernel.reshape(math.prod(shape[:self.in_dims]), math.prod(feats))
            y = fp8_matmul(x.astype(self.dtype).reshape(*lead, -1), matrix, stored_scales(self, "kernel"),
                           scale_fmt=self.fp8)
            return y.reshape(*lead, *feats)
        kernel = stored_weight(self, "kernel", kernel, self.in_dims)
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
