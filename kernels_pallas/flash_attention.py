"""FlashAttention-2 (Dao 2023) with causal + document masking, for MLA's training and prefill shapes, in Pallas.

Query i of row b sees key j iff j <= q_positions[b, i] and kv_segment_ids[b, j] == q_segment_ids[b, i]. With
S = scale Q K^T (f32, masked), the forward walks a query block's key blocks j with a running max m, sum l and
accumulator acc (f32):

    m' = max(m, rowmax S_j),  l' = e^(m - m') l + rowsum P_j,  acc' = e^(m - m') acc + P_j V_j,  P_j = e^(S_j - m')
    O = acc / l,  lse = m + log l  (saved for the backward)

and the backward recomputes P = exp(S - lse) per (query block, key block) pair:

    delta = rowsum(dO * O),  dV = P^T dO,  dS = P * (dO V^T - delta),  dK = scale dS^T Q,  dQ = scale dS K

in two kernels: dK, dV per key block over its query blocks (computed as S^T [keys, queries], so every matmul is NN
or NT and the per-query lse and delta stay lane-dense rows [b, h, 1, t]), dQ per query block over its key blocks
(no atomics). Key blocks past a query block's last position are skipped, no DMA and no FLOPs (`block_ranges`): causal
training does half the work. Every kernel is one "phase" (load the outer block, init, step over an inner block,
finish) run by one of two drivers: Triton (GPU: [b, t, h, d] read in place, a loop over the inner blocks, head
dims in power-of-two pieces as Triton tiles must be: 192 = 128 + 64) and Mosaic (TPU: [b, h, t, d], a transpose;
the inner blocks an "arbitrary" grid axis with VMEM scratch, the block ranges prefetched to SMEM).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import by_platform, dot

_NEG = -1e30  # a finite -inf for the running max: a query that sees nothing keeps l = 0 and gives zeros
_EMPTY_LSE = 1e30  # such a query's log-sum-exp: the backward's P = exp(S - lse) is 0 there
# (block_q, block_k) by backend. GPU: 64 x 64 keeps a [64, 192] query block and the f32 accumulators in
# registers. TPU: a grid step costs ~0.35 us and a 128 x 128 block with dqk + dv = 320 is ~25 ns of v5p MXU time,
# so 512 x 512 (capped at the padded lengths; compiles for v5p within VMEM). At t = 4096 causal that runs 36 of 64
# block pairs (32 ideal); 128-blocks would run 528 of 1024 but pay ~16x the steps.
BLOCKS = {"gpu": (64, 64), "tpu": (512, 512)}
F32 = jnp.float32


def _scores(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> jax.Array:
    """sum over head-dim pieces of a_i b_i^T: [rows of a, rows of b] in f32."""
    out = dot(a[0], b[0], 1, 1)
    for x, y in zip(a[1:], b[1:], strict=True):
        out = out + dot(x, y, 1, 1)
    return out


def _visible(pos: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, key0, key_axis: int) -> jax.Array:
    """The mask of queries (pos, q_seg) against keys key0, key0 + 1, ... (kv_seg), the keys along key_axis:
    [bq, bk] from columns pos, q_seg [bq, 1] and a row kv_seg [1, bk], or its transpose."""
    shape = jnp.broadcast_shapes(pos.shape, kv_seg.shape)
    return (key0 + lax.broadcasted_iota(jnp.int32, shape, key_axis) <= pos) & (q_seg == kv_seg)


def _probs_and_dscores(s, dp, lse, delta, visible) -> tuple[jax.Array, jax.Array]:
    """P = exp(S - lse) (0 where masked) and dS = P (dP - delta), f32, from S and dP = dO V^T (or transposes)."""
    p = jnp.where(visible, jnp.exp(s - lse), 0.0)
    return p, p * (dp - delta)


def _column(row: jax.Array) -> jax.Array:
    """[1, n] -> [n, 1]."""
    return row[0][:, None]


def _read(ref, pieces, rows=slice(None)) -> tuple[jax.Array, ...]:
    return tuple(ref[rows, pl.ds(o, w)] for o, w in pieces)


def _store(ref, values, pieces) -> None:
    for (o, w), x in zip(pieces, values, strict=True):
        ref[:, pl.ds(o, w)] = x.astype(ref.dtype)


class _Phase(NamedTuple):
    """One kernel: outer block refs (loaded once), inner block refs (stepped over), outputs, f32 carry.
    qk / vk: the (offset, width) pieces of the qk and v head dims."""
    qk: tuple[tuple[int, int], ...]
    vk: tuple[tuple[int, int], ...]
    scale: float


class _Forward(_Phase):
    """outer: a query block (q_pos, q_seg columns, q); inner: key blocks (kv_seg row, k, v); out: o, lse (a row)."""
    n_outer, name, num_warps = 3, "flash_attention_fwd", 4

    def load(self, pos_ref, qseg_ref, q_ref):
        return pos_ref[...], qseg_ref[...], _read(q_ref, self.qk)

    def init(self, rows: int):
        return (jnp.full((rows, 1), _NEG, F32), jnp.zeros((rows, 1), F32),
                *(jnp.zeros((rows, w), F32) for _, w in self.vk))

    def step(self, outer, kvseg_ref, k_ref, v_ref, rows, starts, carry):
        (pos, qseg, q), (m, lsum, *acc) = outer, carry
        s = _scores(q, _read(k_ref, self.qk, rows)) * self.scale
        visible = _visible(pos, qseg, kvseg_ref[:, rows], starts[1], 1)
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, _NEG), axis=1, keepdims=True))
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        v = _read(v_ref, self.vk, rows)
        pv = p.astype(v[0].dtype)  # the PV matmul runs in v's dtype
        return (m_new, alpha * lsum + jnp.sum(p, axis=1, keepdims=True),
                *(alpha * a + dot(pv, x, 1, 0) for a, x in zip(acc, v, strict=True)))

    def finish(self, carry, o_ref, lse_ref):
        m, lsum, *acc = carry
        seen = lsum > 0
        safe = jnp.where(seen, lsum, 1.0)
        _store(o_ref, [a / safe for a in acc], self.vk)
        lse_ref[...] = jnp.squeeze(jnp.where(seen, m + jnp.log(safe), _EMPTY_LSE), 1)[None]


class _DQ(_Phase):
    """outer: a query block (q_pos, q_seg columns, q, dO, lse, delta rows); inner: key blocks (kv_seg row, k, v);
    out: dq. S and dS are [bq, bk]."""
    n_outer, name, num_warps = 6, "flash_attention_dq", 8

    def load(self, pos_ref, qseg_ref, q_ref, do_ref, lse_ref, delta_ref):
        return (pos_ref[...], qseg_ref[...], _read(q_ref, self.qk), _read(do_ref, self.vk), _column(lse_ref[...]),
                _column(delta_ref[...]))

    def init(self, rows: int):
        return tuple(jnp.zeros((rows, w), F32) for _, w in self.qk)

    def step(self, outer, kvseg_ref, k_ref, v_ref, rows, starts, carry):
        pos, qseg, q, do, lse, delta = outer
        k = _read(k_ref, self.qk, rows)
        s, dp = _scores(q, k) * self.scale, _scores(do, _read(v_ref, self.vk, rows))
        ds = _probs_and_dscores(s, dp, lse, delta, _visible(pos, qseg, kvseg_ref[:, rows], starts[1], 1))[1]
        ds = ds.astype(k[0].dtype)
        return tuple(c + dot(ds, x, 1, 0) for c, x in zip(carry, k, strict=True))

    def finish(self, carry, dq_ref):
        _store(dq_ref, [self.scale * c for c in carry], self.qk)


class _DKV(_Phase):
    """outer: a key block (kv_seg column, k, v); inner: query blocks (q_pos, q_seg rows, q, dO, lse, delta rows);
    out: dk, dv. S^T, P^T and dS^T are [bk, bq]: the query-side vectors stay rows and every matmul is NN or NT."""
    n_outer, name, num_warps = 3, "flash_attention_dkv", 8

    def load(self, kvseg_ref, k_ref, v_ref):
        return kvseg_ref[...], _read(k_ref, self.qk), _read(v_ref, self.vk)

    def init(self, rows: int):
        return tuple(jnp.zeros((rows, w), F32) for _, w in self.qk + self.vk)

    def step(self, outer, pos_ref, qseg_ref, q_ref, do_ref, lse_ref, delta_ref, rows, starts, carry):
        kvseg, k, v = outer
        q, do = _read(q_ref, self.qk, rows), _read(do_ref, self.vk, rows)
        visible = _visible(pos_ref[:, rows], qseg_ref[:, rows], kvseg, starts[0], 0)
        p, ds = _probs_and_dscores(_scores(k, q) * self.scale, _scores(v, do), lse_ref[:, rows], delta_ref[:, rows],
                                   visible)
        p, ds, n = p.astype(do[0].dtype), ds.astype(q[0].dtype), len(self.qk)
        return (*(c + dot(ds, x, 1, 0) for c, x in zip(carry[:n], q, strict=True)),
                *(c + dot(p, x, 1, 0) for c, x in zip(carry[n:], do, strict=True)))

    def finish(self, carry, dk_ref, dv_ref):
        n = len(self.qk)
        _store(dk_ref, [self.scale * c for c in carry[:n]], self.qk)
        _store(dv_ref, carry[n:], self.vk)


def _gpu_kernel(lo_ref, hi_ref, *refs, phase, blocks: tuple[int, int], n_inner: int):
    """Program (outer block, batch, head): loads the outer block, loops over inner blocks lo..hi-1."""
    outer_refs, inner_refs = refs[:phase.n_outer], refs[phase.n_outer:phase.n_outer + n_inner]
    outer_start, outer = pl.program_id(0) * blocks[0], phase.load(*outer_refs)

    def body(j, carry):
        start = pl.multiple_of(j * blocks[1], blocks[1])
        return phase.step(outer, *inner_refs, pl.ds(start, blocks[1]), (outer_start, start), carry)

    carry = lax.fori_loop(lo_ref[()], hi_ref[()], body, phase.init(blocks[0]))
    phase.finish(carry, *refs[phase.n_outer + n_inner:])


def _tpu_kernel(lo_ref, hi_ref, *refs, phase, blocks: tuple[int, int], n_inner: int, n_out: int):
    """Grid step (batch, head, outer block, inner block j): one inner block into the VMEM scratch carry,
    skipped outside lo..hi-1 (its index map then repeats a live block: no DMA)."""
    split = phase.n_outer + n_inner
    outer_refs, inner_refs = refs[:phase.n_outer], refs[phase.n_outer:split]
    out_refs, scratch = refs[split:split + n_out], refs[split + n_out:]
    b, o, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        for sc, x in zip(scratch, phase.init(blocks[0]), strict=True):
            sc[...] = x

    @pl.when((j >= lo_ref[b, o]) & (j < hi_ref[b, o]))
    def _step():
        carry = tuple(sc[...] for sc in scratch)
        carry = phase.step(phase.load(*outer_refs), *inner_refs, slice(None), (o * blocks[0], j * blocks[1]), carry)
        for sc, x in zip(scratch, carry, strict=True):
            sc[...] = x

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        phase.finish(tuple(sc[...] for sc in scratch), *out_refs)


def block_ranges(q_positions: jax.Array, block_q: int, block_k: int, key_blocks: int) -> tuple[jax.Array, jax.Array]:
    """Which block pairs run, from q_positions [b, t_pad] (-1 = sees nothing): per query block the number of key
    blocks it runs over, those up to its largest position ([b, t_pad / block_q]); per key block the first query
    block whose range includes it (query blocks if none; [b, key_blocks]). Exact for positions that grow along
    t (training, prefill); otherwise the key-block loop may run a fully masked pair, which is still correct."""
    b = q_positions.shape[0]
    last = jnp.max(q_positions.reshape(b, -1, block_q), axis=-1)
    kv_end = jnp.clip(last // block_k + 1, 0, key_blocks).astype(jnp.int32)
    runs = kv_end[:, :, None] > jnp.arange(key_blocks)  # [b, query blocks, key blocks]
    q_start = jnp.where(jnp.any(runs, axis=1), jnp.argmax(runs, axis=1), kv_end.shape[1]).astype(jnp.int32)
    return kv_end, q_start


def _spec(kind: str, family: str, rows: int, width: int, where) -> pl.BlockSpec:
    """BlockSpec of `rows` sequence rows of one (batch, head); where(*grid ids) -> (batch, head, block index).
    kind: "seq" [b, t, h, d] (GPU) / [b, h, t, d] (TPU); "col" [b, t, 1]; "row" [b, 1, t]; "hrow" [b, h, 1, t].
    On TPU a column's HBM tiles pad it 128-fold: only small int vectors travel as columns, and only as outer blocks
    (one DMA per outer block)."""
    blocks = {"seq": (None, rows, None, width) if family == "gpu" else (None, None, rows, width),
              "col": (None, rows, 1), "row": (None, 1, rows), "hrow": (None, None, 1, rows)}

    def index(*ids):
        b, h, i = where(*ids)
        return {"seq": (b, i, h, 0) if family == "gpu" else (b, h, i, 0), "col": (b, i, 0), "row": (b, 0, i),
                "hrow": (b, h, 0, i)}[kind]

    return pl.BlockSpec(blocks[kind], index)


def _run(phase: _Phase, family: str, outer: list, inner: list, outs: list, lo: jax.Array, hi: jax.Array,
         blocks: tuple[int, int], interpret: bool, cost: pl.CostEstimate) -> list[jax.Array]:
    """pallas_call of a phase; outer / inner: (array, kind), outs: (ShapeDtypeStruct, kind), all in the family's
    layout and padded to whole blocks; lo, hi [b, outer blocks]: the inner blocks that run."""
    seq = next(x for x, kind in outer if kind == "seq")
    seq_axis = 2 if family == "tpu" else 1
    batch, heads = seq.shape[0], seq.shape[3 - seq_axis]
    n_outer, n_inner = lo.shape[1], next(x for x, kind in inner if kind == "seq").shape[seq_axis] // blocks[1]
    specs = lambda arrays, rows, at: [_spec(kind, family, rows, x.shape[-1], at) for x, kind in arrays]
    kernel_kw = dict(phase=phase, blocks=blocks, n_inner=len(inner))
    if family == "gpu":
        outer_at, inner_at = (lambda o, b, h: (b, h, o)), (lambda o, b, h: (b, h, 0))
        grid_spec = pl.GridSpec(
            grid=(n_outer, batch, heads), in_specs=[pl.BlockSpec((None, None), lambda o, b, h: (b, o))] * 2
            + specs(outer, blocks[0], outer_at) + specs(inner, n_inner * blocks[1], inner_at),
            out_specs=specs(outs, blocks[0], outer_at))
        kernel, params = _gpu_kernel, plgpu.CompilerParams(num_warps=phase.num_warps, num_stages=2)
    else:
        def inner_at(b, h, o, j, lo_ref, hi_ref):  # outside lo..hi-1 the nearest live block: no new DMA
            return b, h, jnp.clip(jnp.clip(j, lo_ref[b, o], hi_ref[b, o] - 1), 0, n_inner - 1)

        outer_at = lambda b, h, o, j, lo_ref, hi_ref: (b, h, o)
        carry = jax.eval_shape(lambda: phase.init(blocks[0]))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(batch, heads, n_outer, n_inner),
            in_specs=specs(outer, blocks[0], outer_at) + specs(inner, blocks[1], inner_at),
            out_specs=specs(outs, blocks[0], outer_at), scratch_shapes=[pltpu.VMEM(c.shape, F32) for c in carry])
        kernel, kernel_kw["n_out"] = _tpu_kernel, len(outs)
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))
    return pl.pallas_call(functools.partial(kernel, **kernel_kw), out_shape=[x for x, _ in outs],
                          grid_spec=grid_spec, compiler_params=params, interpret=interpret, cost_estimate=cost,
                          name=phase.name)(lo, hi, *(x for x, _ in outer + inner))


class _Options(NamedTuple):
    scale: float
    block_q: int | None
    block_k: int | None
    interpret: bool | None


def _pieces(d: int, family: str) -> tuple[tuple[int, int], ...]:
    """(offset, width) of the head dim's pieces: whole on TPU, powers of two >= 16 on GPU (192 = 128 + 64)."""
    if family == "tpu":
        return ((0, d),)
    if d % 16:
        raise ValueError(f"flash_attention on GPU: head dim {d} is not a multiple of 16 (Triton's minimum tile)")
    widths = [1 << i for i in reversed(range(d.bit_length())) if d & (1 << i)]
    return tuple((sum(widths[:i]), w) for i, w in enumerate(widths))


def _blocks(opts: _Options, family: str, t: int, s: int) -> tuple[int, int]:
    bq, bk = BLOCKS[family]
    if family == "tpu":
        bq, bk = min(bq, pl.cdiv(t, 128) * 128), min(bk, pl.cdiv(s, 128) * 128)
    else:
        bq, bk = min(bq, max(16, pl.next_power_of_2(t))), min(bk, max(16, pl.next_power_of_2(s)))
    return opts.block_q or bq, opts.block_k or bk


class _Prepared(NamedTuple):
    """Inputs padded to whole blocks, in the family's layout, with the block ranges and static settings."""
    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_cols: list  # q_positions, q_segment_ids as (array [b, t_pad, 1], "col")
    q_rows: list  # ... as (array [b, 1, t_pad], "row")
    kv_seg_row: tuple  # (kv_segment_ids [b, 1, s_pad], "row")
    kv_seg_col: tuple  # (kv_segment_ids [b, s_pad, 1], "col")
    kv_end: jax.Array  # [b, query blocks]
    q_start: jax.Array  # [b, key blocks]
    blocks: tuple[int, int]
    interpret: bool
    pairs: float  # visible (query, key) pairs of a causal prefill, times b h: for the cost estimates


def _pad(x: jax.Array, n: int, value=0) -> jax.Array:
    """x padded along axis 1 to n."""
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _layout(x: jax.Array, family: str) -> jax.Array:
    """[b, t, h, d] <-> the family's layout ([b, h, t, d] on TPU)."""
    return x.transpose(0, 2, 1, 3) if family == "tpu" else x


def _prepare(q, k, v, pos, q_seg, kv_seg, opts: _Options, family: str) -> _Prepared:
    (b, t, h, _), s = q.shape, k.shape[1]
    bq, bk = _blocks(opts, family, t, s)
    if not opts.interpret:
        tpu_ok, gpu_ok = bq % 128 == 0 and bk % 128 == 0, all(x >= 16 and not x & (x - 1) for x in (bq, bk))
        if not (tpu_ok if family == "tpu" else gpu_ok):
            raise ValueError(f"flash_attention on {family}: block_q={bq}, block_k={bk}; want "
                             + ("multiples of 128 (Mosaic tiling)" if family == "tpu" else "powers of 2 >= 16"))
    t_pad, s_pad = pl.cdiv(t, bq) * bq, pl.cdiv(s, bk) * bk
    # keys past s exist only as padding: clipping positions to s - 1 keeps them invisible
    pos = _pad(jnp.clip(pos, -1, s - 1), t_pad, -1)
    q_seg, kv_seg = _pad(q_seg, t_pad, -1), _pad(kv_seg, s_pad, -1)
    kv_end, q_start = block_ranges(pos, bq, bk, s_pad // bk)
    q, k, v = (_layout(_pad(x, n), family) for x, n in ((q, t_pad), (k, s_pad), (v, s_pad)))
    return _Prepared(q, k, v, [(pos[:, :, None], "col"), (q_seg[:, :, None], "col")],
                     [(pos[:, None], "row"), (q_seg[:, None], "row")], (kv_seg[:, None], "row"),
                     (kv_seg[:, :, None], "col"), kv_end, q_start, (bq, bk), opts.interpret,
                     b * h * (t * max(s - t, 0) + t * (t + 1) / 2))


def _seq_out(like: jax.Array, width: int, dtype) -> tuple[jax.ShapeDtypeStruct, str]:
    return jax.ShapeDtypeStruct((*like.shape[:-1], width), dtype), "seq"


def _cost(pairs: float, flops_per_pair: int, *arrays: jax.Array) -> pl.CostEstimate:
    """For XLA's scheduler, which cannot see into the kernel (a causal layout assumed)."""
    return pl.CostEstimate(flops=int(pairs * flops_per_pair), transcendentals=int(pairs),
                           bytes_accessed=sum(x.size * x.dtype.itemsize for x in arrays))


def _forward(q, k, v, pos, q_seg, kv_seg, *, opts: _Options, family: str) -> tuple[jax.Array, jax.Array]:
    """o [b, t, h, dv] and lse [b, h, t] (f32)."""
    p = _prepare(q, k, v, pos, q_seg, kv_seg, opts, family)
    (b, t, h, dqk), dv = q.shape, v.shape[-1]
    phase = _Forward(_pieces(dqk, family), _pieces(dv, family), opts.scale)
    lse = jax.ShapeDtypeStruct((b, h, 1, p.kv_end.shape[1] * p.blocks[0]), F32)
    o, lse = _run(phase, family, [*p.q_cols, (p.q, "seq")], [p.kv_seg_row, (p.k, "seq"), (p.v, "seq")],
                  [_seq_out(p.q, dv, q.dtype), (lse, "hrow")], jnp.zeros_like(p.kv_end), p.kv_end, p.blocks,
                  p.interpret, _cost(p.pairs, 2 * (dqk + dv), p.q, p.k, p.v, p.q))
    return _layout(o, family)[:, :t], lse[:, :, 0, :t]


def _backward(q, k, v, pos, q_seg, kv_seg, o, lse, do, *, opts: _Options, family: str):
    """dq, dk, dv: FlashAttention-2's backward, dK/dV per key block and dQ per query block."""
    p = _prepare(q, k, v, pos, q_seg, kv_seg, opts, family)
    (t, s), (dqk, d_v) = (q.shape[1], k.shape[1]), (q.shape[-1], v.shape[-1])
    t_pad = p.kv_end.shape[1] * p.blocks[0]
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1).transpose(0, 2, 1)  # [b, h, t]
    lse, delta = ((jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - t)), constant_values=c)[:, :, None], "hrow")
                  for x, c in ((lse, _EMPTY_LSE), (delta, 0.0)))
    do = _layout(_pad(do, t_pad), family)
    pieces = (_pieces(dqk, family), _pieces(d_v, family), opts.scale)
    dk, dv = _run(_DKV(*pieces), family, [p.kv_seg_col, (p.k, "seq"), (p.v, "seq")],
                  [*p.q_rows, (p.q, "seq"), (do, "seq"), lse, delta],
                  [_seq_out(p.k, dqk, k.dtype), _seq_out(p.k, d_v, v.dtype)], p.q_start,
                  jnp.full_like(p.q_start, p.kv_end.shape[1]), p.blocks[::-1], p.interpret,
                  _cost(p.pairs, 4 * (dqk + d_v), p.q, p.k, p.v, do, p.k, p.v))
    (dq,) = _run(_DQ(*pieces), family, [*p.q_cols, (p.q, "seq"), (do, "seq"), lse, delta],
                 [p.kv_seg_row, (p.k, "seq"), (p.v, "seq")], [_seq_out(p.q, dqk, q.dtype)], jnp.zeros_like(p.kv_end),
                 p.kv_end, p.blocks, p.interpret, _cost(p.pairs, 2 * (2 * dqk + d_v), p.q, p.k, p.v, do, p.q))
    return _layout(dq, family)[:, :t], _layout(dk, family)[:, :s], _layout(dv, family)[:, :s]


def _dispatch(fn, opts: _Options, *args):
    """fn's TPU or GPU body, chosen when lowering for the platform lowered for (on CPU: the GPU one, interpreted)."""
    def body(*args, family: str, interpret: bool):
        return fn(*args, opts=opts._replace(interpret=interpret), family=family)

    return by_platform(body, opts.interpret, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, pos, q_seg, kv_seg, opts: _Options):
    return _dispatch(_forward, opts, q, k, v, pos, q_seg, kv_seg)[0]


def _attention_fwd(q, k, v, pos, q_seg, kv_seg, opts: _Options):
    o, lse = _dispatch(_forward, opts, q, k, v, pos, q_seg, kv_seg)
    return o, (q, k, v, pos, q_seg, kv_seg, o, lse)


def _attention_bwd(opts: _Options, res, do):
    return (*_dispatch(_backward, opts, *res, do), None, None, None)  # no cotangents for the integer inputs


_attention.defvjp(_attention_fwd, _attention_bwd)


def reference(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, scale: float) -> jax.Array:
    """The plain XLA path flash_attention replaces: the same rule as a materialized [b, 1, t, s] mask, softmax in
    f32 (probabilities in v's dtype for the PV matmul); zeros where a query sees nothing."""
    keep = ((jnp.arange(k.shape[1]) <= q_positions[:, :, None])
            & (kv_segment_ids[:, None, :] == q_segment_ids[:, :, None]))[:, None]
    s = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=F32) * scale
    p = jax.nn.softmax(jnp.where(keep, s, _NEG), axis=-1) * keep
    return jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype), v).astype(q.dtype)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, q_segment_ids: jax.Array,
                    kv_segment_ids: jax.Array, scale: float, *, block_q: int | None = None, block_k: int | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """q [b, t, h, dqk], k [b, s, h, dqk], v [b, s, h, dv] -> [b, t, h, dv] (q.dtype).
    Query i of row b sees key j iff j <= q_positions[b, i] and kv_segment_ids[b, j] == q_segment_ids[b, i]
    (causal + document masking; key j's position is its index j). A query that sees no key gives zeros.

    FlashAttention-2 (Dao 2023), differentiable in q, k, v. block_q / block_k: rows per block (default
    BLOCKS: 64 x 64 on GPU, powers of two; 512 x 512 on TPU, capped at the padded lengths, multiples of 128).
    t and s need not be multiples of them (padded). interpret=None interprets on CPU."""
    (b, t, h, dqk), s = (q.shape if q.ndim == 4 else (0,) * 4), k.shape[1] if k.ndim == 4 else 0
    if q.ndim != 4 or k.shape != (b, s, h, dqk) or v.shape[:3] != (b, s, h) or v.ndim != 4:
        raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape}; want q [b, t, h, dqk], "
                         "k [b, s, h, dqk], v [b, s, h, dv]")
    for name, x, n in (("q_positions", q_positions, t), ("q_segment_ids", q_segment_ids, t),
                       ("kv_segment_ids", kv_segment_ids, s)):
        if x.shape != (b, n):
            raise ValueError(f"flash_attention: {name} has shape {x.shape}, want {(b, n)}")
    opts = _Options(float(scale), block_q, block_k, interpret)
    return _attention(q, k, v, q_positions.astype(jnp.int32), q_segment_ids.astype(jnp.int32),
                      kv_segment_ids.astype(jnp.int32), opts)
