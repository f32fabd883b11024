"""Meshes over (data, fsdp, expert, tensor) and the one table mapping logical axes to them.

Params carry logical axis names (nn.with_logical_partitioning); RULES maps each name to mesh
axes. The batch is split over every axis but `tensor`; routed experts live on `expert`.

Context parallelism: a step with fewer rows than batch shards (long sequences, e.g. 4 rows of 128k tokens on
128 chips) puts its rows over the leading batch axes that divide them and the sequence over the rest
(`data_layout`, `rules`). Attention then gathers the keys' latents whole (MLA's 576 values and the DSA
indexer's 128 per token) and runs each query block on the devices holding it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the axes rows (and, under context parallelism, the sequence) split over

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


def data_layout(mesh: Mesh, rows: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(row axes, length axes) of a [rows, length] batch: rows over the batch axes in order while their sizes
    divide `rows`, the sequence over the rest (context parallelism). Axes of size 1 count as row axes."""
    row_axes, n = [], 1
    for i, axis in enumerate(BATCH_AXES):
        if rows % (n * mesh.shape[axis]):
            return tuple(row_axes), tuple(a for a in BATCH_AXES[i:] if mesh.shape[a] > 1)
        row_axes.append(axis)
        n *= mesh.shape[axis]
    return tuple(row_axes), ()


def rules(row_axes: tuple[str, ...] = BATCH_AXES, length_axes: tuple[str, ...] = ()) -> tuple:
    """RULES with `batch` over row_axes and `length` over length_axes."""
    table = dict(RULES) | {"batch": row_axes or None, "length": length_axes or None}
    return tuple(table.items())


def rules_for(mesh: Mesh, rows: int) -> tuple:
    """The rules table of a step of `rows` rows on `mesh` (context parallel when rows are too few)."""
    return rules(*data_layout(mesh, rows))


def axes_of(logical: str) -> tuple[str, ...]:
    """The mesh axes the active logical-axis rules give a logical axis (() outside a mesh or unsharded)."""
    if jax.sharding.get_abstract_mesh().empty:
        return ()
    axes = nn.logical_to_mesh_axes((logical,))[0]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def length_shards() -> int:
    """How many ways the active rules split the sequence (1 without context parallelism)."""
    axes = axes_of("length")
    return math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes) if axes else 1


def length_shards_of(table: tuple, mesh: Mesh) -> int:
    """How many ways a rules table splits the sequence on `mesh`."""
    axes = dict(table).get("length") or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def batch_sharding(mesh: Mesh, table: tuple = RULES) -> NamedSharding:
    """[batch, length] arrays: rows (and, under context parallelism, the sequence) over data, fsdp and expert."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length"), table))


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


def split_length(x: jax.Array, chunk: int) -> jax.Array:
    """[batch, length, ...] -> [n, batch, shards * chunk, ...]: consecutive blocks of `chunk` positions of each of
    the `length_shards()` parts of the sequence (zero-padded to whole blocks), block i of every part side by side.
    A loop over the n blocks then never runs over a sharded axis: each step holds one block per context shard."""
    batch, length = x.shape[:2]
    cp = length_shards()
    local = length // cp
    n = -(-local // chunk)
    x = x.reshape(batch, cp, local, *x.shape[2:])
    x = jnp.pad(x, [(0, 0), (0, 0), (0, n * chunk - local)] + [(0, 0)] * (x.ndim - 3))
    x = jnp.moveaxis(x.reshape(batch, cp, n, chunk, *x.shape[3:]), 2, 0)
    return x.reshape(n, batch, cp * chunk, *x.shape[4:])


def merge_length(y: jax.Array, length: int) -> jax.Array:
    """Inverse of split_length for outputs [n, batch, shards * chunk, ...] -> [batch, length, ...]."""
    n, batch = y.shape[:2]
    cp = length_shards()
    y = y.reshape(n, batch, cp, -1, *y.shape[3:])
    y = jnp.moveaxis(y, 0, 2).reshape(batch, cp, -1, *y.shape[4:])[:, :, :length // cp]
    return y.reshape(batch, length, *y.shape[3:])
