"""The serving engine: continuous batching over a paged latent cache.

  slots     max_batch decode rows. A request takes a free slot when it is admitted and leaves it when it ends,
            between steps, so requests join and leave a running batch (continuous batching; Orca, vLLM).
  pages     the cache is one pool of page_size-token pages (layers.mla.PagedCache); each slot's row of the page
            table lists its pages. A sequence takes a page when it grows into one and frees all of them when it
            ends, so memory follows live tokens. Prompt pages are shared through the prefix cache (serve.pages).
  prefill   a prompt is computed `chunk` tokens per engine step, one chunk between two decode steps, so a long
            prompt never stalls the running requests (chunked prefill, Sarathi).
  decode    one token for every running slot, each drawn with its request's own temperature, top_k, top_p and
            seed (the key of token i is fold_in(key(seed), i), so a request samples the same tokens alone or in
            any batch).
  buckets   chunk lengths and the number of table pages a step reads come from fixed sets, so after warm-up the
            engine never compiles again.
  pressure  a request is admitted only if the pages of its prompt are free; a running request that needs a page
            when none is left preempts the youngest running request, which frees its pages and waits to be
            computed again (vLLM's recompute preemption). Nothing ever writes a page its row does not own.

The engine is token-level and single-threaded: `step` does one iteration, `serve_forever` loops in a thread,
and `submit` / `cancel` may be called from any thread (they queue for the loop).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.infer.cache import latent_zeros
from deepseek_jax.infer.decode import draft_tokens
from deepseek_jax.infer.sampling import row_probabilities, speculative_accept
from deepseek_jax.layers.mla import LatentCache, PagedCache, store
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.serve.pages import PagePool, page_hashes


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling: greedy at temperature 0; top_k 0 = off; seed None = a fresh random one."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, ok, want in (("temperature", self.temperature >= 0, ">= 0"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("top_k", self.top_k >= 0, ">= 0"),
                               ("max_tokens", self.max_tokens >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)} must be {want}")


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt in the engine. `sink(new_tokens, finish_reason)` is called from the engine's thread for every
    token (finish_reason None) and once at the end with the reason: "stop" (a stop token or `cancel(reason=
    "stop")`), "length" (max_tokens or the context), "cancelled"."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[list[int], str | None], None] | None = None
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    end_time: float | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    # engine state
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens of `context` in the cache
    seed: int = 0

    @property
    def context(self) -> list[int]:
        """What the cache must hold before the next decode step: the prompt and every output token but the last."""
        return self.prompt + self.output[:-1]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _buckets(top: int, low: int = 1) -> tuple[int, ...]:
    """Powers of two from `low` below `top`, then `top`."""
    return (*(b for b in (low << i for i in range(64)) if b < top), top)


class Engine:
    """Continuous batching for one model on one host (params placed or sharded by the caller; under a mesh and
    the logical-axis rules the model shards as in training).

    max_batch decode slots; max_len tokens per sequence (prompt and output); num_pages pages of page_size tokens
    (default: enough for every slot at max_len); chunk: prefill tokens per step; eos_id ends a request.
    speculative: every decode step also verifies the MTP modules' drafts (V3 sec. 5.4.3), up to depth + 1 tokens
    per row and step; greedy output is unchanged and sampling keeps its distribution (infer.sampling)."""

    def __init__(self, cfg: ModelConfig, params: Any, *, max_batch: int = 8, max_len: int = 1024,
                 page_size: int = 64, num_pages: int | None = None, chunk: int = 128, eos_id: int | None = None,
                 cache_dtype: str | None = None, prefix_caching: bool = True, speculative: bool = False):
        if speculative and not cfg.num_nextn_predict_layers:
            raise ValueError("speculative decoding drafts with the MTP modules, but this model has "
                             "num_nextn_predict_layers=0; serve without --speculative")
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if chunk < 1 or max_batch < 1:
            raise ValueError(f"need chunk >= 1 and max_batch >= 1, got {chunk} and {max_batch}")
        self.cfg, self.params, self.eos_id, self.prefix_caching = cfg, params, eos_id, prefix_caching
        self.max_batch, self.max_len, self.page_size = max_batch, max_len, page_size
        self.max_pages = -(-max_len // page_size)
        self.pages = PagePool(num_pages or max_batch * self.max_pages, page_size)
        self.depth = cfg.num_nextn_predict_layers if speculative else 0
        dtype = jnp.dtype(cache_dtype or cfg.dtype)
        pool = functools.partial(_empty_pool, cfg, num_pages=self.pages.num_pages, page_size=page_size, dtype=dtype)
        self.dev = Device(tuple(pool(count) for _, _, count in cfg.layer_segments),
                          tuple(pool(None) for _ in range(self.depth)), jnp.zeros((max_batch, self.depth), jnp.int32),
                          jnp.zeros((max_batch, self.depth, cfg.vocab_size), jnp.float32))
        self.table = np.full((max_batch, self.max_pages), self.pages.num_pages, np.int32)
        self.prefill_program, self.decode_program = (jax.jit(f, static_argnames=("cfg", "kv_len"), donate_argnums=1)
                                                     for f in (prefill_chunk, decode_step))  # this engine's own
        self.page_buckets = _buckets(self.max_pages)
        self.batch_buckets = _buckets(max_batch)
        self.chunk_buckets = _buckets(chunk, min(16, chunk))
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * max_batch
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.steps = self.preemptions = self.drafted = self.accepted = 0
        self._rng = np.random.default_rng()

    # -- the API, from any thread --------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
               sink: Callable[[list[int], str | None], None] | None = None) -> Request:
        """Queue a prompt (token ids); raises ValueError if it can never run here."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self.cfg.vocab_size})")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this server's context is {self.max_len} tokens "
                             f"(prompt and output), so at most {self.max_len - 1} fit")
        if -(-len(prompt) // self.page_size) > self.pages.num_pages:
            raise ValueError(f"the prompt needs more pages than the cache has ({self.pages.num_pages})")
        request = Request(prompt, params, sink)
        request.seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
        self.inbox.put(("submit", request))
        self.wake.set()
        return request

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        """End a request early (a client gone, a stop string seen); its slot and pages are freed by the loop."""
        self.inbox.put(("cancel", request, reason))
        self.wake.set()

    def serve_forever(self) -> None:
        """Step while there is work, sleep while there is none; returns after `stop`."""
        while not self.stopping:
            if not self.step():
                self.wake.wait(0.05)
                self.wake.clear()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def cancel_all(self, reason: str = "cancelled") -> None:
        """End every queued and running request now, freeing their pages (call it with no loop serving)."""
        self._drain()
        for request in [*self.running, *self.waiting]:
            self._finish(request, reason)
        self.waiting.clear()

    def close(self) -> None:
        """Drop this engine's compiled programs: XLA:CPU keeps each in hundreds of memory mappings, and a process
        may hold only vm.max_map_count (65,530) of them; jax's caches would otherwise keep them all."""
        for program in (self.prefill_program, self.decode_program):
            program.clear_cache()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 = SamplingParams()) -> list[Request]:
        """Run prompts to the end on this thread (no loop must be serving); returns the finished requests."""
        each = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        requests = [self.submit(p, s) for p, s in zip(prompts, each, strict=True)]
        while not all(r.done for r in requests):
            self.step()
        return requests

    # -- state -----------------------------------------------------------------------------------------------------

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and self.inbox.empty()

    def compiled(self) -> int:
        """Programs this engine has compiled (the prefill and decode buckets it used)."""
        return self.prefill_program._cache_size() + self.decode_program._cache_size()

    def warmup(self) -> int:
        """Compile every bucket now (writes go nowhere: the table names no page), so no request waits for a
        compile; returns the number of programs."""
        nowhere = jnp.full((self.max_batch, self.max_pages), self.pages.num_pages, jnp.int32)
        for pages in self.page_buckets:
            kv_len = pages * self.page_size
            for width in self.chunk_buckets:
                self.dev, _ = self.prefill_program(self.params, self.dev, nowhere[:1], jnp.zeros((2, width), jnp.int32),
                                       jnp.int32(0), jnp.int32(0), jnp.int32(1), jnp.bool_(True),
                                       self._sampling([None]), cfg=self.cfg, kv_len=kv_len)
            for rows in self.batch_buckets:
                nobody = jnp.full((rows,), self.max_batch, jnp.int32)
                self.dev, _ = self.decode_program(self.params, self.dev, nobody, nowhere[:rows], nobody, nobody,
                                      self._sampling([None] * rows), cfg=self.cfg, kv_len=kv_len)
        jax.block_until_ready(self.dev)
        return len(self.page_buckets) * (len(self.chunk_buckets) + len(self.batch_buckets))

    # -- the loop ------------------------------------------------------------------------------------------------

    def step(self) -> bool:
        """One iteration: take queued submits and cancels, admit, run one prefill chunk and one decode step.
        Returns whether there was anything to do."""
        self._drain()
        self._admit()
        prefilling = [r for r in self.running if r.computed < len(r.context)]
        decoding = [r for r in self.running if r.computed == len(r.context)]
        if not prefilling and not decoding:
            return False
        if prefilling:
            self._prefill(min(prefilling, key=lambda r: r.arrival))
        if decoding:
            self._decode(decoding)
        self.steps += 1
        return True

    def _drain(self) -> None:
        while not self.inbox.empty():
            op, request, *rest = self.inbox.get()
            if op == "submit":
                self.waiting.append(request)
            elif not request.done:
                if request in self.waiting:
                    self.waiting.remove(request)
                self._finish(request, rest[0])

    def _admit(self) -> None:
        """Waiting requests, oldest first, into free slots while the pages of their context are available."""
        while self.waiting and None in self.slots:
            request = self.waiting[0]
            context = request.context
            shared = self.pages.match(context) if self.prefix_caching else []
            own = self.pages.allocate(-(-len(context) // self.page_size) - len(shared))
            if own is None:
                self.pages.release(shared)
                return
            self.waiting.popleft()
            request.slot = self.slots.index(None)
            self.slots[request.slot] = request
            request.pages, request.computed = shared + own, len(shared) * self.page_size
            if not request.output:
                request.cached_tokens = request.computed
            self._write_table(request)

    def _write_table(self, request: Request) -> None:
        row = self.table[request.slot]
        row[:] = self.pages.num_pages
        row[:len(request.pages)] = request.pages

    def _prefill(self, request: Request) -> None:
        context = request.context
        start = request.computed
        n = min(len(context) - start, self.chunk_buckets[-1])
        width = next(b for b in self.chunk_buckets if b >= n)
        tokens = np.zeros((2, width), np.int32)  # the chunk, and (for the MTP modules) the tokens one ahead
        ahead = (context + request.output[-1:])[start + 1:start + n + 1]
        tokens[0, :n], tokens[1, :len(ahead)] = context[start:start + n], ahead
        kv_pages = next(b for b in self.page_buckets if b * self.page_size >= min(start + width, self.max_len))
        last = request.computed + n == len(context)
        fresh = last and not request.output  # a first prefill ends with the first token; a recompute has it
        row = jnp.asarray(self.table[request.slot:request.slot + 1])
        self.dev, token = self.prefill_program(self.params, self.dev, row, jnp.asarray(tokens), jnp.int32(request.slot),
                                               jnp.int32(start), jnp.int32(n), jnp.bool_(fresh),
                                               self._sampling([request]), cfg=self.cfg,
                                               kv_len=kv_pages * self.page_size)
        request.computed += n
        if self.prefix_caching:  # publish the prompt pages this chunk completed
            keys = page_hashes(request.prompt[:request.computed], self.page_size)
            for i in range(start // self.page_size, len(keys)):
                self.pages.publish(request.pages[i], keys[i])
        if fresh:
            self._emit(request, [int(np.asarray(token)[0])])

    def _decode(self, requests: list[Request]) -> None:
        for request in sorted(requests, key=lambda r: r.arrival):  # the pages the step writes (depth + 1 slots)
            while request.slot is not None and (request.computed + self.depth) // self.page_size >= len(request.pages):
                if len(request.pages) == self.max_pages:  # the end of the context: later slots drop
                    break
                page = self.pages.allocate(1)
                if page is None:
                    self._preempt(exclude=request)
                    continue
                request.pages += page
                self._write_table(request)
        requests = [r for r in requests if r.slot is not None]
        if not requests:
            return
        width = next(b for b in self.batch_buckets if b >= len(requests))  # the rows the step computes
        slots = np.full((width,), self.max_batch, np.int32)  # padding rows: no slot, no page
        tokens, positions = np.zeros((width,), np.int32), np.zeros((width,), np.int32)
        table = np.full((width, self.max_pages), self.pages.num_pages, np.int32)
        for i, r in enumerate(requests):
            slots[i], tokens[i], positions[i], table[i] = r.slot, r.output[-1], r.computed, self.table[r.slot]
        kv_pages = next((b for b in self.page_buckets if b * self.page_size > positions.max() + self.depth),
                        self.max_pages)
        rows = self._sampling(requests + [None] * (width - len(requests)))
        self.dev, (emitted, counts) = self.decode_program(self.params, self.dev, jnp.asarray(slots), jnp.asarray(table),
                                                          jnp.asarray(tokens), jnp.asarray(positions), rows,
                                                          cfg=self.cfg, kv_len=kv_pages * self.page_size)
        emitted, counts = np.asarray(emitted), np.asarray(counts)
        for i, r in enumerate(requests):
            count = int(counts[i])
            self.drafted += self.depth
            self.accepted += count - 1
            r.computed += count
            self._emit(r, emitted[i, :count].tolist())

    def _sampling(self, rows: Sequence[Request | None]) -> tuple[jax.Array, ...]:
        """Per-row (temperature, top_k, top_p, seed, index of the token drawn) for a step's rows."""
        def column(get: Callable[[Request], Any], dtype: Any, empty: Any) -> jax.Array:
            return jnp.asarray(np.array([empty if r is None else get(r) for r in rows], dtype))

        return (column(lambda r: r.params.temperature, np.float32, 0.0), column(lambda r: r.params.top_k, np.int32, 0),
                column(lambda r: r.params.top_p, np.float32, 1.0), column(lambda r: r.seed, np.uint32, 0),
                column(lambda r: len(r.output), np.int32, 0))

    def _emit(self, request: Request, tokens: list[int]) -> None:
        """Append tokens to the output up to the first that ends the request."""
        now = time.perf_counter()
        if request.first_token_time is None:
            request.first_token_time = now
        p, reason = request.params, None
        for i, token in enumerate(tokens):
            if token in p.stop_token_ids or (token == self.eos_id and self.eos_id is not None):
                reason = "stop"
            elif (len(request.output) + i + 1 >= p.max_tokens
                  or len(request.prompt) + len(request.output) + i + 1 >= self.max_len):
                reason = "length"
            if reason:
                tokens = tokens[:i + 1]
                break
        request.output += tokens
        if request.sink:
            request.sink(tokens, None)
        if reason:
            self._finish(request, reason)

    def _release(self, request: Request) -> None:
        if request.slot is not None:
            self.slots[request.slot] = None
            self.table[request.slot] = self.pages.num_pages
            request.slot = None
        self.pages.release(request.pages)
        request.pages, request.computed = [], 0

    def _finish(self, request: Request, reason: str) -> None:
        self._release(request)
        request.finish_reason, request.end_time = reason, time.perf_counter()
        if request.sink:
            request.sink([], reason)

    def _preempt(self, exclude: Request) -> None:
        """Free the youngest other running request's pages; it waits at the front to be computed again."""
        victims = [r for r in self.running if r is not exclude]
        if not victims:  # one sequence alone outgrew the pool: end it rather than touch another's pages
            self._finish(exclude, "length")
            return
        victim = max(victims, key=lambda r: r.arrival)
        self._release(victim)
        self.waiting.appendleft(victim)
        self.preemptions += 1


class Device(NamedTuple):
    """What the engine keeps on the device between steps."""

    layers: tuple[LatentCache, ...]  # the main model's pages, per stack: [count, num_pages, page_size, ...]
    mtp: tuple[LatentCache, ...]  # each MTP module's pages (speculative only): [num_pages, page_size, ...]
    drafts: jax.Array  # [max_batch, depth] each slot's drafts of the tokens after its newest
    draft_probs: jax.Array  # [max_batch, depth, vocab] the distributions they were drawn from


def _empty_pool(cfg: ModelConfig, count: int | None, num_pages: int, page_size: int, dtype: jnp.dtype) -> LatentCache:
    """A LatentCache whose leaves are [count, num_pages, page_size, ...] (the layers of one stack; count None:
    one layer)."""
    return latent_zeros(cfg, (*(() if count is None else (count,)), num_pages, page_size), dtype)


def _forward(cfg: ModelConfig, params: Any, pool: tuple[LatentCache, ...], table: jax.Array, tokens: jax.Array,
             positions: jax.Array, kv_len: int) -> tuple[jax.Array, tuple[LatentCache, ...]]:
    """The main model on tokens [batch, T] at positions over the paged pool: (last hidden states, the pool)."""
    caches = tuple(PagedCache(p, jnp.broadcast_to(table, (count, *table.shape)))
                   for p, (_, _, count) in zip(pool, cfg.layer_segments, strict=True))
    h, new = DeepSeekV3(cfg).apply({"params": params}, tokens, positions, caches, kv_len, method=DeepSeekV3.decode)
    return h, tuple(store(PagedCache(p, table), n, positions).pool for p, n in zip(pool, new, strict=True))


def _row_keys(sampling: tuple[jax.Array, ...], salt: int = 0) -> jax.Array:
    """Each row's key for the token it draws next: fold_in(key(seed), index), salted for the drafts."""
    _, _, _, seed, index = sampling
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed, index)
    return keys if not salt else jax.vmap(lambda k: jax.random.fold_in(k, salt))(keys)


def _choose(sampling: tuple[jax.Array, ...], keys: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(one token per row of logits [batch, vocab] with its row's settings and key, the distributions)."""
    probs = row_probabilities(logits, *sampling[:3])
    return jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p)))(keys, probs).astype(jnp.int32), probs


def _drafts(cfg: ModelConfig, params: Any, dev: Device, table: jax.Array, h: jax.Array, positions: jax.Array,
            ahead: jax.Array, index: jax.Array, kv_len: int, sampling: tuple[jax.Array, ...]
            ) -> tuple[jax.Array, jax.Array, tuple[LatentCache, ...]]:
    """infer.decode.draft_tokens over the MTP modules' pages, each row drawing with its own settings."""
    keys = _row_keys(sampling, salt=1)
    caches = [PagedCache(p, table) for p in dev.mtp]
    drafts, probs, new = draft_tokens(cfg, params, caches, h, positions, ahead, index, kv_len, lambda logits, k: (
        _choose(sampling, jax.vmap(lambda key: jax.random.fold_in(key, k))(keys), logits)))
    return drafts, probs, tuple(store(c, n, positions).pool for c, n in zip(caches, new, strict=True))


def _logits(cfg: ModelConfig, params: Any, h: jax.Array) -> jax.Array:
    return DeepSeekV3(cfg).apply({"params": params}, h, method=DeepSeekV3.final_logits)


def prefill_chunk(params, dev: Device, table, tokens, slot, start, n, fresh, sampling, *, cfg, kv_len):
    """Chunk tokens[0] [W] (the first n real) at start.. into the pages; the token drawn after the last real one.
    Speculative: the MTP modules take the chunk with tokens[1], the tokens one ahead (the drawn token after the
    last when `fresh`), and the last chunk's drafts go to the slot's row."""
    positions = start + jnp.arange(tokens.shape[1])[None]
    h, layers = _forward(cfg, params, dev.layers, table, tokens[:1], positions, kv_len)
    token, _ = _choose(sampling, _row_keys(sampling), _logits(cfg, params, h[:, n - 1]))
    dev = dev._replace(layers=layers)
    if dev.mtp:
        ahead = jnp.where(fresh & (jnp.arange(tokens.shape[1]) == n - 1), token[0], tokens[1])[None]
        drafts, probs, mtp = _drafts(cfg, params, dev, table, h, positions, ahead, n - 1 + jnp.zeros(1, jnp.int32),
                                     kv_len, sampling)
        dev = Device(layers, mtp, dev.drafts.at[slot].set(drafts[0]), dev.draft_probs.at[slot].set(probs[0]))
    return dev, token


def decode_step(params, dev: Device, slots, table, tokens, positions, sampling, *, cfg, kv_len):
    """The decoding slots' newest tokens [R] at their positions [R] (and their drafts after them) into the pages;
    returns the tokens each row emits [R, depth + 1] and how many [R]: the accepted drafts and one drawn token.
    Rows past the live ones have slot max_batch: their table names no page and their drafts are dropped."""
    depth = dev.drafts.shape[1]
    window = positions[:, None] + jnp.arange(depth + 1)
    drafts = dev.drafts.at[slots].get(mode="fill", fill_value=0)
    h, layers = _forward(cfg, params, dev.layers, table, jnp.concatenate([tokens[:, None], drafts], 1), window,
                         kv_len)
    keys = _row_keys(sampling)
    if not depth:
        token, _ = _choose(sampling, keys, _logits(cfg, params, h[:, 0]))
        return dev._replace(layers=layers), (token[:, None], jnp.ones_like(token))
    q = dev.draft_probs.at[slots].get(mode="fill", fill_value=0)
    p = row_probabilities(_logits(cfg, params, h), *sampling[:3])
    accepted, nxt = jax.vmap(lambda p, q, d, k: jax.tree_util.tree_map(
        lambda x: x[0], speculative_accept(p[None], q[None], d[None], k)))(p, q, drafts, keys)
    j = jnp.arange(depth + 1)
    emitted = jnp.where(j < accepted[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
    drafts, probs, mtp = _drafts(cfg, params, dev, table, h, window, emitted, accepted, kv_len, sampling)
    return Device(layers, mtp, dev.drafts.at[slots].set(drafts, mode="drop"),
                  dev.draft_probs.at[slots].set(probs, mode="drop")), (emitted, accepted + 1)
