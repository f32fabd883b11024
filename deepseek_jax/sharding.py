"""Meshes over (data, fsdp, expert, tensor) and the one table mapping logical axes to them.

Params carry logical axis names (nn.with_logical_partitioning); RULES maps each name to mesh
axes. The batch is split over every axis but `tensor`; routed experts live on `expert`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "expert", "tensor")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("q_lora", "fsdp"),  # MLA's low-rank dims carry FSDP where `embed` is not in the same kernel
    ("kv_lora", "fsdp"),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("layers", None),
)


class MeshError(ValueError):
    """A mesh does not fit the devices or the model; the message names the axis and the dimension."""


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
    """Resolve one -1 entry to the rest of the devices; check the product."""
    unknown = [a for a in AXES if sizes.get(a, 1) == -1]
    if len(unknown) > 1:
        raise MeshError(f"mesh axes {unknown} are all -1; at most one axis may take the rest of the devices")
    known = math.prod(sizes.get(a, 1) for a in AXES if a not in unknown)
    if n_devices % known:
        raise MeshError(f"mesh sizes {dict(sizes)} multiply to {known}, which does not divide {n_devices} devices")
    shape = tuple(n_devices // known if a in unknown else sizes.get(a, 1) for a in AXES)
    if math.prod(shape) != n_devices:
        raise MeshError(f"mesh {dict(zip(AXES, shape, strict=True))} uses {math.prod(shape)} devices, "
                        f"but {n_devices} are present; set one axis to -1 to take the rest")
    return shape


def make_mesh(sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """Mesh with Auto axes (XLA SPMD propagates shardings; we constrain at layer boundaries)."""
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(sizes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def logical_shardings(mesh: Mesh, boxed: Any) -> Any:
    """NamedShardings for a pytree of nn.Partitioned / LogicallyPartitioned leaves."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, length] arrays: rows split over data, fsdp and expert."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), RULES))


def check_divisible(boxed: Any, mesh: Mesh) -> None:
    """Every sharded param dim must divide by its mesh axes' size; name the param, dim and axis if not."""
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
    for path, leaf in flat:
        if not isinstance(leaf, nn.meta.AxisMetadata):
            continue
        spec = nn.logical_to_mesh_axes(leaf.names, RULES)
        for dim, (size, axes, logical) in enumerate(zip(leaf.value.shape, spec, leaf.names, strict=False)):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            n = math.prod(mesh.shape[a] for a in axes)
            if size % n:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise MeshError(f"param {name} dim {dim} ({logical}={size}) does not divide over mesh axes "
                                f"{axes} of size {n}; change mesh.{axes[0]} or the model dimension")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
