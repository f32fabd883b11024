"""The training data pipeline: documents -> tokens (+eos) -> packed rows -> per-process batches, all in grain.

Packing is grain's `ConcatThenSplitIterDataset`: documents are concatenated and cut into rows of
`seq_len`, so rows are always full (no padding). Each piece of a document inside a row is its own
segment (ids 1, 2, ... per row; 0 is reserved for padding) and its positions restart at 0, so a
document longer than a row, or one cut at a row end, continues in the next row as a new segment.

Eval split: document i (numbered as in `sources`) is held out iff i % EVAL_EVERY == 0, so every
source with documents has an eval document and the two splits never share one.

Every process builds the same global batches and keeps its own contiguous block of rows, so the
data a step sees does not depend on the number of processes: a run on 2 hosts logs the losses of
a run on 1, and one iterator state serves every process (and a resume on another process count).
Train shuffles with `seed`, differently each epoch, and repeats forever. Eval reads in order and
also repeats (each pass identical), so every process can take the same fixed number of batches.
"""

from __future__ import annotations

import atexit
import copy
import warnings
import weakref
from typing import Any

import grain
import grain.experimental as gx
import numpy as np

from deepseek_jax.data.errors import DataError
from deepseek_jax.data.sources import DataStats, DocumentStore, open_source
from deepseek_jax.data.tokenizer import Tokenizer

EVAL_EVERY = 20
PREFETCH_BATCHES = 2
SPLITS = ("train", "eval")
STATE_VERSION = 2
PER_PROCESS = ("process_index", "process_count", "rows")
_OPEN: weakref.WeakSet = weakref.WeakSet()  # closed at exit, before grain's prefetch thread is torn down


@atexit.register
def _close_open_iterators() -> None:
    for it in list(_OPEN):
        it.close()


class _TrainDoc:
    """j-th train document -> global index (skips every EVAL_EVERY-th)."""

    def __call__(self, j: int) -> int:
        return j + j // (EVAL_EVERY - 1) + 1


class _EvalDoc:
    def __call__(self, j: int) -> int:
        return j * EVAL_EVERY


class _Tokenize:
    """Global document index -> {"tokens": ids + [eos]}, or None for a bad record (grain drops Nones)."""

    def __init__(self, store: DocumentStore, tokenizer: Tokenizer, stats: DataStats):
        self.store, self.tokenizer, self.stats = store, tokenizer, stats

    def __call__(self, index: int) -> dict[str, np.ndarray] | None:
        text = self.store.get(index, self.stats)
        if text is None:
            return None
        self.stats.add(docs_read=1)
        return {"tokens": np.asarray([*self.tokenizer.encode(text), self.tokenizer.eos_id], np.int32)}


class _Rows:
    """This process's contiguous block of rows of a global batch."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[self.start:self.stop] for k, v in batch.items()}


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": row["tokens"].astype(np.int32), "segment_ids": row["tokens_segment_ids"].astype(np.int32),
            "positions": row["tokens_positions"].astype(np.int32)}


class DataIterator:
    """Batches of {"tokens", "segment_ids", "positions"}, int32 [rows, seq_len], with resumable state.

    `get_state()` is JSON-serializable; `set_state` on an iterator built with the same arguments
    makes the next batches exactly those the saved iterator would have produced. The state is the
    same on every process (all walk the same global stream), so one saved state restores them all.
    """

    def __init__(self, dataset: grain.IterDataset, stats: DataStats, meta: dict[str, Any]):
        self._it = iter(dataset)
        self.stats = stats
        self.meta = meta
        self.rows, self.seq_len = meta["rows"], meta["seq_len"]
        _OPEN.add(self)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._grain())

    def _grain(self) -> grain.DatasetIterator:
        if self._it is None:
            raise DataError("this data iterator is closed; make a new one with make_iterator")
        return self._it

    def get_state(self) -> dict[str, Any]:
        shared = {k: v for k, v in self.meta.items() if k not in PER_PROCESS}
        return {"version": STATE_VERSION, **shared, "grain": _to_json(self._grain().get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or "grain" not in state:
            raise DataError(f"data state {str(state)[:200]} is not from this pipeline (version {STATE_VERSION})")
        if state.get("split") != self.meta["split"]:
            raise DataError(f"data state is for split={state.get('split')!r} but this iterator has "
                            f"split={self.meta['split']!r}; save and restore one data state per split")
        changed = {k: (state.get(k), v) for k, v in self.meta.items()
                   if k not in PER_PROCESS and state.get(k) != v}
        if changed:
            warnings.warn(f"restoring a data state saved with other settings {changed} (saved, now); the data "
                          "order will not continue exactly", stacklevel=2)
        self._grain().set_state(_from_json(copy.deepcopy(state["grain"])))

    def close(self) -> None:
        """Stop the prefetch thread. Dropping the grain iterator here (not at interpreter teardown)
        keeps its __del__ from running when modules are already gone."""
        it, self._it = self._it, None
        if it is not None:
            it.close()


def _to_json(state: Any) -> Any:
    """Tuples -> lists, so a JSON round trip returns an equal state."""
    if isinstance(state, dict):
        return {k: _to_json(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_to_json(v) for v in state]
    return state


def _from_json(state: Any) -> Any:
    """ConcatThenSplit compares its `remainder_slices` with tuples: turn them back into tuples."""
    if isinstance(state, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _from_json(v))
                for k, v in state.items()}
    return state


def _count_tokens(store: DocumentStore, docs: grain.MapDataset, tokenizer: Tokenizer, needed: int) -> int:
    """Tokens (with eos) in `docs`, counting only until `needed` is reached."""
    total = 0
    for j in range(len(docs)):
        text = store.get(docs[j])
        if text is not None:
            total += len(tokenizer.encode(text)) + 1
            if total >= needed:
                break
    return total


def make_iterator(source: str, tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int, seed: int,
                  split: str = "train", process_index: int = 0, process_count: int = 1) -> DataIterator:
    """Packed batches of `global_batch_size // process_count` rows of `seq_len` tokens for this process.

    source: "default" (the embedded corpus) or files; see `deepseek_jax.data.sources`.
    split="train" is shuffled and endless; split="eval" is the held-out documents in a fixed order,
    also endless (it starts over after each pass): take a fixed number of batches.
    """
    if split not in SPLITS:
        raise DataError(f"split={split!r}; use one of {SPLITS}")
    if seq_len < 2 or global_batch_size < 1:
        raise DataError(f"seq_len={seq_len} must be >= 2 and global_batch_size={global_batch_size} >= 1")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise DataError(f"global_batch_size={global_batch_size} must be divisible by process_count={process_count}; "
                        "change data.batch_size")
    if not 0 <= seed < 2**32:
        raise DataError(f"seed={seed} must be in [0, 2**32)")
    rows = global_batch_size // process_count
    stats = DataStats()
    store = open_source(source, stats)
    n_eval = -(-len(store) // EVAL_EVERY)
    if split == "train":
        docs = grain.MapDataset.range(len(store) - n_eval).map(_TrainDoc())
    else:
        docs = grain.MapDataset.range(n_eval).map(_EvalDoc())
    stats.add(docs_in_split=len(docs))

    needed = global_batch_size * seq_len
    available = _count_tokens(store, docs, tokenizer, needed)
    where = f"the {split} split of {store.name}"
    if split == "train" and available < needed:
        raise DataError(f"{where} has {available} tokens ({len(docs)} documents) but one batch needs {needed} "
                        f"(seq_len {seq_len} x {global_batch_size} rows); use a smaller data.batch_size or "
                        "data.seq_len, "
                        "or more data")
    if split == "eval" and available == 0:
        raise DataError(f"{where} has no tokens ({len(docs)} documents; every {EVAL_EVERY}th document is held "
                        "out); use more data")
    if split == "eval" and available < needed:
        warnings.warn(f"{where} has {available} tokens, less than one batch ({needed}); eval batches repeat it",
                      stacklevel=2)

    if split == "train":
        docs = docs.shuffle(seed)
    # Tokenizing holds the GIL, so few reader threads; the batch-level thread prefetch overlaps
    # tokenizing and packing with the caller's device step.
    ds = (docs.repeat().map(_Tokenize(store, tokenizer, stats))
          .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)))
    ds = gx.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
    ds = ds.map(_rename).batch(global_batch_size, drop_remainder=True)
    ds = ds.map(_Rows(process_index * rows, (process_index + 1) * rows))
    ds = gx.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=PREFETCH_BATCHES)
    meta = dict(source=source, split=split, seed=seed, seq_len=seq_len, rows=rows,
                global_batch_size=global_batch_size, process_index=process_index, process_count=process_count,
                docs_in_source=len(store))
    return DataIterator(ds, stats, meta)
