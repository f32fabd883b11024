"""Expert parallelism: routed experts sharded over the mesh's `expert` axis, dropless.

Inside shard_map every device holds a slice of the batch and experts/ep experts. It sorts its
(token, expert) assignments by expert, sends each to the device that holds that expert with one
all-to-all over `expert`, runs one grouped matmul over the rows it received, and returns the
results with a second all-to-all. Without ragged collectives the send buffers are padded to the
worst case (every assignment to one device), so no token is ever dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp", "expert")


def expert_axis_size() -> int:
    """Size of the ambient mesh's `expert` axis (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "expert" not in mesh.axis_names else mesh.shape["expert"]


def expert_parallel(ffn: Callable, x: jax.Array, weights: jax.Array, idx: jax.Array,
                    expert_params: tuple[jax.Array, ...]) -> jax.Array:
    """x [tokens, embed], weights/idx [tokens, top_k] sharded over the batch axes; expert_params each
    [experts, ...] sharded over `expert`. ffn(rows sorted by local expert, sizes, *params) -> rows."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    tok = P(batch, None)
    fn = jax.shard_map(functools.partial(_dispatch_compute_combine, ffn), mesh=mesh,
                       in_specs=(tok, tok, tok, *(P("expert") for _ in expert_params)), out_specs=tok,
                       check_vma=False)
    return fn(x, weights, idx, *expert_params)


def _dispatch_compute_combine(ffn, x, weights, idx, *params):
    ep = jax.lax.axis_size("expert")
    n_tok, k = idx.shape
    local = params[0].shape[0]
    rows = n_tok * k
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert = flat[order]
    token = order // k
    dest = expert // local
    sent = jnp.bincount(dest, length=ep)
    slot = jnp.arange(rows) - (jnp.cumsum(sent) - sent)[dest]

    # dispatch: send_x[j] holds the rows for device j; `local` marks an empty slot
    send_x = jnp.zeros((ep, rows, x.shape[-1]), x.dtype).at[dest, slot].set(x[token])
    send_e = jnp.full((ep, rows), local, jnp.int32).at[dest, slot].set(expert % local)
    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0).reshape(ep * rows, -1)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0).reshape(-1)

    # one grouped matmul over the local experts; empty slots sort last and give zeros
    by_expert = jnp.argsort(recv_e, stable=True)
    sizes = jnp.bincount(recv_e, length=local + 1)[:local].astype(jnp.int32)
    ys = ffn(recv_x[by_expert], sizes, *params)
    out = jnp.zeros((ep * rows, ys.shape[-1]), ys.dtype).at[by_expert].set(ys).reshape(ep, rows, -1)

    # combine: results travel back to their senders, then each token sums its k experts
    back = jax.lax.all_to_all(out, "expert", 0, 0)[dest, slot]
    back = back.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n_tok, back.shape[-1]), jnp.float32).at[token].add(back).astype(x.dtype)
