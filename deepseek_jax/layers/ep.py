"""Expert parallelism: routed experts sharded over the mesh's `expert` axis, dropless.

Inside shard_map every device holds a slice of the batch and experts/ep experts. It sorts its
(token, expert) assignments by expert, sends each to the device that holds that expert with one
all-to-all over `expert`, runs one grouped matmul over the rows it received, and returns the
results with a second all-to-all. With ragged collectives (TPU, GPU) only real rows travel;
without them (XLA:CPU) the send buffers are padded to the worst case (every assignment to one
device). Either way no token is ever dropped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.sharding import BATCH_AXES, axes_of, data_layout


def expert_axis_size() -> int:
    """Size of the ambient mesh's `expert` axis (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "expert" not in mesh.axis_names else mesh.shape["expert"]


def expert_parallel(ffn: Callable, x: jax.Array, weights: jax.Array, idx: jax.Array,
                    expert_params: tuple[jax.Array, ...], ragged: bool = False, chunk: int = 0) -> jax.Array:
    """x [batch, length, embed], weights/idx [batch, length, top_k] laid out as the active rules lay out
    activations (rows over the batch axes; under context parallelism the sequence too); expert_params each
    [experts, ...] sharded over `expert`. ffn(rows sorted by local expert, sizes, *params) -> rows.

    ragged=True moves only the real rows with jax.lax.ragged_all_to_all (TPU, GPU); otherwise a padded
    all_to_all (XLA:CPU implements no ragged collective). chunk > 0 dispatches each device's tokens in
    rounds of `chunk` (each rematerialized), bounding the exchange buffers."""
    mesh = jax.sharding.get_abstract_mesh()
    rows, length = axes_of("batch"), axes_of("length")
    if not rows and not length:  # outside logical-axis rules: rows over every batch axis of the mesh
        rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)
    if x.shape[0] % size(rows) or x.shape[1] % size(length):  # e.g. init's single row: this array's own layout
        rows, length = data_layout(mesh, x.shape[0])
    tok = P(rows or None, length or None, None)

    def local(x, weights, idx, *params):  # this device's tokens, flattened
        flat = [a.reshape(-1, a.shape[-1]) for a in (x, weights, idx)]
        out = _in_rounds(functools.partial(_dispatch_compute_combine, ffn, ragged), chunk, *flat, *params)
        return out.reshape(x.shape)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, *(P("expert") for _ in expert_params)),
                       out_specs=tok, check_vma=False)
    return fn(x, weights, idx, *expert_params)


def _in_rounds(fn: Callable, chunk: int, x, weights, idx, *params):
    """fn over consecutive blocks of `chunk` tokens (one device's share), rematerialized per block."""
    n_tok = x.shape[0]
    if not chunk or n_tok <= chunk or n_tok % chunk:
        return fn(x, weights, idx, *params)
    blocks = [a.reshape(n_tok // chunk, chunk, *a.shape[1:]) for a in (x, weights, idx)]
    out = jax.lax.map(jax.checkpoint(lambda b: fn(*b, *params)), tuple(blocks))
    return out.reshape(n_tok, -1)


def sort_by_expert(idx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """idx [tokens, top_k] -> (order of the flat assignments by expert, their expert ids, their tokens)."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    return order, flat[order], order // idx.shape[-1]


def combine(rows: jax.Array, weights: jax.Array, order: jax.Array, token: jax.Array, like: jax.Array) -> jax.Array:
    """y_t = sum_k g_tk FFN_k(x_t): rows [assignments, embed] in `order`, summed per token in float32."""
    rows = rows.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((like.shape[0], rows.shape[-1]), jnp.float32).at[token].add(rows).astype(like.dtype)


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _padded_exchange(rows: jax.Array, expert: jax.Array, dest: jax.Array, sent: jax.Array, empty: int):
    """Dispatch with a padded all_to_all: slot j of every device's send buffer is sized for all rows."""
    ep, n = sent.shape[0], rows.shape[0]
    slot = jnp.arange(n) - _exclusive_cumsum(sent)[dest]
    send_x = jnp.zeros((ep, n, rows.shape[-1]), rows.dtype).at[dest, slot].set(rows)
    send_e = jnp.full((ep, n), empty, jnp.int32).at[dest, slot].set(expert)
    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0).reshape(ep * n, -1)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0).reshape(-1)

    def back(out: jax.Array) -> jax.Array:
        return jax.lax.all_to_all(out.reshape(ep, n, -1), "expert", 0, 0)[dest, slot]

    return recv_x, recv_e, back


def _ragged_exchange(rows: jax.Array, expert: jax.Array, dest: jax.Array, sent: jax.Array, empty: int):
    """Dispatch with ragged_all_to_all: only real rows travel. counts[i, j] = rows device i sends to j."""
    del dest
    ep, n = sent.shape[0], rows.shape[0]
    me = jax.lax.axis_index("expert")
    counts = jax.lax.all_gather(sent, "expert")  # [ep, ep]
    recv = counts[:, me]
    # my chunk for device j lands after the chunks of lower-numbered senders
    out_offsets = _exclusive_cumsum(counts, axis=0)[me]
    in_offsets = _exclusive_cumsum(sent)
    buf = ep * n
    recv_x = jax.lax.ragged_all_to_all(rows, jnp.zeros((buf, rows.shape[-1]), rows.dtype), in_offsets, sent,
                                       out_offsets, recv, axis_name="expert")
    recv_e = jax.lax.ragged_all_to_all(expert, jnp.full((buf,), empty, jnp.int32), in_offsets, sent,
                                       out_offsets, recv, axis_name="expert")

    def back(out: jax.Array) -> jax.Array:
        # return each sender's rows to where they came from in its sorted buffer
        return jax.lax.ragged_all_to_all(out, jnp.zeros((n, out.shape[-1]), out.dtype), _exclusive_cumsum(recv),
                                         recv, _exclusive_cumsum(counts, axis=1)[:, me], sent, axis_name="expert")

    return recv_x, recv_e, back


def _dispatch_compute_combine(ffn, ragged, x, weights, idx, *params):
    ep = jax.lax.axis_size("expert")
    local = params[0].shape[0]
    order, expert, token = sort_by_expert(idx)  # by expert, hence by destination device
    dest = expert // local
    sent = jnp.bincount(dest, length=ep).astype(jnp.int32)
    exchange = _ragged_exchange if ragged else _padded_exchange
    recv_x, recv_e, back = exchange(x[token], (expert % local).astype(jnp.int32), dest, sent, local)

    # one grouped matmul over the local experts; empty slots (id `local`) sort last and give zeros
    by_expert = jnp.argsort(recv_e, stable=True)
    sizes = jnp.bincount(recv_e, length=local + 1)[:local].astype(jnp.int32)
    ys = ffn(recv_x[by_expert], sizes, *params)
    out = jnp.zeros((recv_x.shape[0], ys.shape[-1]), ys.dtype).at[by_expert].set(ys)

    # combine: results travel back to their senders, then each token sums its k experts
    return combine(back(out), weights, order, token, x)
