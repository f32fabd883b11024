"""Generation over the latent cache: prefill, then a compiled decode loop, with MTP speculative decoding.

  prefill  the prompts [batch, P] (right-padded; each row's length in `lengths`) go through the model in
           one pass that fills the cache; each row's first new token is drawn at its last prompt position.
  step     the newest token and D drafts go through the main model in one forward at positions n..n+D
           (D = 0 without speculation). The longest prefix of drafts that the main model agrees with is
           accepted, plus one corrected (or bonus) token (sampling.speculative_accept); each row's cache
           length advances by accepted + 1, which rolls back the rest. The MTP modules then take the main
           model's hidden states and the accepted tokens, fill their own caches and draft the next D tokens
           (V3 sec. 2.2: module k predicts t_{i+k+1} from h^{k-1}_i and t_{i+k}).
  loop     lax.while_loop over steps until every row has emitted EOS or max_new_tokens.

The loop is one compiled program; `stream` runs it `chunk` steps at a time so text can be shown as it comes.
Rows stop independently; finished rows ride along without emitting.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.backend import resolve
from deepseek_jax.config import ModelConfig
from deepseek_jax.infer.cache import Cache, constrain, init_cache
from deepseek_jax.infer.sampling import Sampling, draw, probabilities, speculative_accept
from deepseek_jax.layers.ep import BATCH_AXES
from deepseek_jax.model import DeepSeekV3


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything static about one generation call (hashable: one compile per distinct value)."""

    cfg: ModelConfig
    max_new_tokens: int
    max_len: int  # cache slots per row
    sampling: Sampling
    speculative: bool = False
    eos_id: int | None = None
    stop: tuple[tuple[int, ...], ...] = ()  # token sequences that end a row (kept), like eos_id
    cache_dtype: str | None = None
    cache_layout: str = "latent"
    pad_id: int = 0

    @property
    def depth(self) -> int:
        """Draft tokens per step: one per MTP module when speculative, else 0."""
        return self.cfg.num_nextn_predict_layers if self.speculative else 0


class DecodeState(flax.struct.PyTreeNode):
    cache: Cache
    out: jax.Array  # [batch, max_new_tokens + depth + 1] generated tokens (pad beyond n_out)
    n_out: jax.Array  # [batch] tokens generated so far
    done: jax.Array  # [batch] bool: EOS emitted or max_new_tokens reached
    last: jax.Array  # [batch] the newest token, not yet in the cache
    drafts: jax.Array  # [batch, depth] MTP drafts of the tokens after `last`
    draft_probs: jax.Array  # [batch, depth, vocab] the distributions they were drawn from
    key: jax.Array
    steps: jax.Array  # [] decode steps run
    drafted: jax.Array  # [] drafts verified (rows still running)
    accepted: jax.Array  # [] drafts accepted


class Completion(NamedTuple):
    """Host-side result. tokens [batch, P + max_new_tokens]: the prompts as given, then each row's new tokens
    from column P (pad after the row's end); completions [batch, max_new_tokens] are those new tokens."""

    tokens: np.ndarray
    completions: np.ndarray
    num_generated: np.ndarray  # [batch]
    done: np.ndarray  # [batch]
    steps: int
    drafted: int
    accepted: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def _apply(s: Settings, params: Any, method: Any, *args: Any) -> Any:
    return DeepSeekV3(s.cfg).apply({"params": params}, *args, method=method)


def _emit(state: DecodeState, tokens: jax.Array, counts: jax.Array, s: Settings) -> DecodeState:
    """Append each running row's first counts[b] of tokens [batch, width], up to the first that completes
    EOS or a stop sequence, and max_new_tokens in all."""
    batch, width = tokens.shape
    j = jnp.arange(width)
    slot = state.n_out[:, None] + j
    valid = (j < counts[:, None]) & ~state.done[:, None] & (slot < s.max_new_tokens)
    rows = jnp.arange(batch)[:, None]
    hit = jnp.zeros((batch, width), bool)
    stops = s.stop + (((s.eos_id,),) if s.eos_id is not None else ())
    if stops:
        trial = state.out.at[rows, jnp.where(valid, slot, state.out.shape[1])].set(tokens, mode="drop")
        for seq in stops:  # does the generated text end with `seq` at slot j?
            window = slot[:, :, None] - len(seq) + 1 + jnp.arange(len(seq))
            ends = (trial[rows[:, :, None], jnp.maximum(window, 0)] == jnp.asarray(seq)) & (window >= 0)
            hit |= jnp.all(ends, axis=-1)
        hit &= valid
        valid &= jnp.cumsum(hit, axis=1) - hit == 0  # nothing after the first stop
    out = state.out.at[rows, jnp.where(valid, slot, state.out.shape[1])].set(tokens, mode="drop")
    n_out = state.n_out + valid.sum(1).astype(jnp.int32)
    stopped = jnp.any(hit & valid, axis=1)
    return state.replace(out=out, n_out=n_out, done=state.done | stopped | (n_out >= s.max_new_tokens))


def draft_tokens(cfg: ModelConfig, params: Any, caches: Sequence[Any], h: jax.Array, positions: jax.Array,
                 ahead: jax.Array, index: jax.Array, kv_len: int, choose: Callable[[jax.Array, int], tuple]
                 ) -> tuple[jax.Array, jax.Array, tuple]:
    """Run the MTP modules over a window of positions [batch, W] with the main model's hidden states h
    [batch, W, embed] and the tokens one ahead, valid up to `index` [batch] (the newest position); draft the
    token after the newest from each module in turn, each module one position further ahead. choose(logits
    [batch, vocab], k) -> (token [batch], the distribution it was drawn from). Returns (drafts [batch, D],
    their distributions [batch, D, vocab], the modules' updated caches)."""
    rows = jnp.arange(h.shape[0])
    drafts, probs, new = [], [], []
    for k, cache in enumerate(caches):
        h, h_norm, cache = DeepSeekV3(cfg).apply({"params": params}, k, h, ahead, positions, cache, kv_len,
                                                 method=DeepSeekV3.mtp_decode)
        d, q = choose(DeepSeekV3(cfg).apply({"params": params}, h_norm[rows, index],
                                            method=DeepSeekV3.head_logits), k)
        ahead = jnp.roll(ahead, -1, axis=1).at[rows, index].set(d)  # module k+1 reads t_{i+k+2}
        drafts.append(d)
        probs.append(q)
        new.append(cache)
    return jnp.stack(drafts, 1), jnp.stack(probs, 1), tuple(new)


def _draft(params: Any, state: DecodeState, h: jax.Array, positions: jax.Array, ahead: jax.Array,
           index: jax.Array, kv_len: int, key: jax.Array, s: Settings) -> DecodeState:
    """draft_tokens with the call's one Sampling, into the state."""
    def choose(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        q = probabilities(logits, s.sampling)
        return draw(q, jax.random.fold_in(key, k), s.sampling.greedy), q

    drafts, probs, caches = draft_tokens(s.cfg, params, state.cache.mtp[:s.depth], h, positions, ahead, index,
                                         kv_len, choose)
    return state.replace(cache=state.cache._replace(mtp=caches), drafts=drafts, draft_probs=probs)


def prefill(params: Any, prompts: jax.Array, lengths: jax.Array, key: jax.Array, s: Settings) -> DecodeState:
    """Fill the cache with the prompts and draw each row's first token (and the first drafts)."""
    cfg, (batch, plen) = s.cfg, prompts.shape
    cache = constrain(init_cache(cfg, batch, s.max_len, s.cache_dtype, s.speculative, s.cache_layout))
    positions = jnp.broadcast_to(jnp.arange(plen), (batch, plen))
    h, layers = _apply(s, params, DeepSeekV3.decode, prompts, positions, cache.layers, plen)
    rows, newest = jnp.arange(batch), lengths - 1
    key, k_first, k_draft = jax.random.split(key, 3)
    first = draw(probabilities(_apply(s, params, DeepSeekV3.final_logits, h[rows, newest]), s.sampling), k_first,
                 s.sampling.greedy)
    d = s.depth
    state = DecodeState(
        cache=cache._replace(layers=layers, lengths=lengths), out=jnp.full((batch, s.max_new_tokens + d + 1), s.pad_id),
        n_out=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool), last=first,
        drafts=jnp.zeros((batch, d), jnp.int32), draft_probs=jnp.zeros((batch, d, cfg.vocab_size), jnp.float32),
        key=key, steps=jnp.zeros((), jnp.int32), drafted=jnp.zeros((), jnp.int32), accepted=jnp.zeros((), jnp.int32))
    state = _emit(state, first[:, None], jnp.ones((batch,), jnp.int32), s)
    if d:
        j = jnp.arange(plen)
        ahead = jnp.where(j < newest[:, None], jnp.roll(prompts, -1, axis=1), first[:, None])
        state = _draft(params, state, h, positions, ahead, newest, plen, k_draft, s)
    return state


def step(params: Any, state: DecodeState, s: Settings) -> DecodeState:
    """One decode step: verify [last, drafts] in one forward, accept a prefix plus one token, draft again."""
    width = s.depth + 1
    n = state.cache.lengths
    positions = n[:, None] + jnp.arange(width)
    tokens = jnp.concatenate([state.last[:, None], state.drafts], axis=1)
    h, layers = _apply(s, params, DeepSeekV3.decode, tokens, positions, state.cache.layers, s.max_len)
    p = probabilities(_apply(s, params, DeepSeekV3.final_logits, h), s.sampling)
    k_accept, k_draft = jax.random.split(jax.random.fold_in(state.key, state.steps))
    accepted, nxt = speculative_accept(p, state.draft_probs, state.drafts, k_accept, s.sampling.greedy)
    j = jnp.arange(width)
    emitted = jnp.where(j < accepted[:, None], jnp.pad(state.drafts, ((0, 0), (0, 1))),
                        jnp.where(j == accepted[:, None], nxt[:, None], s.pad_id))
    running = ~state.done
    state = state.replace(
        cache=state.cache._replace(layers=layers, lengths=jnp.where(running, n + accepted + 1, n)),
        last=nxt, steps=state.steps + 1, drafted=state.drafted + s.depth * running.sum(),
        accepted=state.accepted + jnp.where(running, accepted, 0).sum())
    state = _emit(state, emitted, accepted + 1, s)
    if s.depth:
        state = _draft(params, state, h, positions, emitted, accepted, s.max_len, k_draft, s)
    return state


def run(params: Any, state: DecodeState, until: jax.Array, s: Settings) -> DecodeState:
    """Decode steps in a lax.while_loop until step `until` or until every row is done."""
    return jax.lax.while_loop(lambda st: (st.steps < until) & ~jnp.all(st.done),
                              lambda st: step(params, st, s), state)


_prefill = jax.jit(prefill, static_argnames="s")
_run = jax.jit(run, static_argnames="s", donate_argnames="state")


@jax.jit
def _gather(state: DecodeState) -> dict:
    return {"out": state.out, "n_out": state.n_out, "done": state.done, "steps": state.steps,
            "drafted": state.drafted, "accepted": state.accepted}


def _completion(state: DecodeState, prompts: np.ndarray, rows: int, s: Settings) -> Completion:
    g = jax.device_get(_gather(state))
    new = np.asarray(g["out"])[:rows, :s.max_new_tokens]
    return Completion(tokens=np.concatenate([prompts, new], axis=1), completions=new,
                      num_generated=np.asarray(g["n_out"])[:rows], done=np.asarray(g["done"])[:rows],
                      steps=int(g["steps"]), drafted=int(g["drafted"]), accepted=int(g["accepted"]))


def _prepare(cfg: ModelConfig, prompts: Any, max_new_tokens: int, temperature: float, top_p: float,
             rng: jax.Array | None, speculative: bool, *, top_k: int = 0, eos_id: int | None = None,
             stop: Any = (), lengths: Any = None, max_len: int | None = None, cache_dtype: str | None = None,
             cache_layout: str = "latent", pad_id: int = 0) -> tuple[Settings, np.ndarray, jax.Array, jax.Array]:
    """Check the request and settle its Settings; pad the batch to a multiple of the mesh's batch axes (the
    extra rows are dropped again at the end). Returns (settings, prompts, padded prompts, padded lengths)."""
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[1] == 0 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must be integer token ids [batch, length >= 1], got {prompts.dtype} "
                         f"{prompts.shape}")
    batch, plen = prompts.shape
    lengths = np.full((batch,), plen, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > plen:
        raise ValueError(f"lengths {lengths.tolist()} must give each of the {batch} rows a prompt length in "
                         f"[1, {plen}] (prompts are right-padded)")
    if prompts.min() < 0 or prompts.max() >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={cfg.vocab_size}), got "
                         f"[{prompts.min()}, {prompts.max()}]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if speculative and not cfg.num_nextn_predict_layers:
        raise ValueError("speculative=True drafts with the MTP modules, but this config has "
                         "num_nextn_predict_layers=0; generate without speculative")
    needed = plen + max_new_tokens
    if needed > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {plen} + max_new_tokens {max_new_tokens} = {needed} exceeds the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}; shorten the prompt or generate less")
    if max_len is not None and max_len < needed:
        raise ValueError(f"the cache holds max_len={max_len} tokens per row, but the prompt ({plen}) and "
                         f"max_new_tokens ({max_new_tokens}) need {needed}; raise max_len or shorten the prompt")
    slots = (max_len or needed) + (cfg.num_nextn_predict_layers if speculative else 0)  # room for the drafts
    if resolve("decode_attention", cfg.decode_attention) == "pallas":
        slots = -(-slots // 512) * 512  # whole kernel blocks: the kernel would otherwise pad (copy) the cache
    stop = tuple(tuple(int(t) for t in seq) for seq in stop)
    if any(not seq for seq in stop):
        raise ValueError("stop sequences must each hold at least one token id")
    settings = Settings(cfg, max_new_tokens, slots, Sampling(temperature, top_k, top_p), speculative, eos_id, stop,
                        cache_dtype, cache_layout, pad_id)
    mesh = jax.sharding.get_abstract_mesh()
    multiple = 1 if mesh.empty else math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)
    extra = -batch % multiple
    padded = np.pad(prompts.astype(np.int32), ((0, extra), (0, 0)), constant_values=pad_id)
    return settings, prompts, jnp.asarray(padded), jnp.asarray(np.pad(lengths, (0, extra), constant_values=1))


def stream(cfg: ModelConfig, params: Any, prompts: Any, max_new_tokens: int = 64, temperature: float = 0.0,
           top_p: float = 1.0, rng: jax.Array | None = None, speculative: bool = False, *, chunk: int = 8,
           **options: Any) -> Iterator[Completion]:
    """Generate `chunk` decode steps at a time, yielding the Completion so far after the prefill and after
    each chunk (the last one is final). Arguments and options as for `complete`."""
    s, prompts, tokens, lengths = _prepare(cfg, prompts, max_new_tokens, temperature, top_p, rng, speculative,
                                           **options)
    state = _prefill(params, tokens, lengths, _key(rng), s)
    while True:
        result = _completion(state, prompts, prompts.shape[0], s)
        yield result
        if result.done.all() or result.steps >= max_new_tokens:
            return
        state = _run(params, state, jnp.asarray(result.steps + chunk, jnp.int32), s)


def complete(cfg: ModelConfig, params: Any, prompts: Any, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None, speculative: bool = False, **options: Any
             ) -> Completion:
    """Generate up to max_new_tokens per row in one compiled program.

    prompts [batch, P] int, right-padded. Greedy at temperature 0; otherwise temperature, then top_k, then
    top_p, drawn from `rng` (default jax.random.key(0)), so a key reproduces its samples. speculative=True
    drafts with the MTP modules and verifies in one forward: the same tokens greedily, the same distribution
    when sampling. Under a mesh (jax.set_mesh and the logical-axis rules) rows are split over its batch axes.
    Options: top_k (0 = off); eos_id (rows stop after emitting it); stop (token-id sequences that end a row
    once generated, kept in the output, e.g. an encoded "</answer>"); lengths [batch] (each row's prompt length,
    default P); max_len (cache slots per row, default just enough); cache_dtype (default the compute dtype);
    cache_layout ("latent", or "heads" for MHA's per-head K/V, a baseline); pad_id (fills rows after they end).
    """
    s, prompts, tokens, lengths = _prepare(cfg, prompts, max_new_tokens, temperature, top_p, rng, speculative,
                                           **options)
    return _completion(_complete(params, tokens, lengths, _key(rng), s), prompts, prompts.shape[0], s)


def _key(rng: jax.Array | None) -> jax.Array:
    return jax.random.key(0) if rng is None else rng


@functools.partial(jax.jit, static_argnames="s")
def _complete(params: Any, prompts: jax.Array, lengths: jax.Array, key: jax.Array, s: Settings) -> DecodeState:
    return run(params, prefill(params, prompts, lengths, key, s), jnp.asarray(s.max_new_tokens, jnp.int32), s)


def generate(cfg: ModelConfig, params: Any, prompts: Any, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None, speculative: bool = False, **kw: Any) -> np.ndarray:
    """prompts [batch, P] -> tokens [batch, P + max_new_tokens]: the prompts, then the new tokens (pad after a
    row's end). Options (top_k, eos_id, lengths, max_len, ...) as for `complete`."""
    return complete(cfg, params, prompts, max_new_tokens, temperature, top_p, rng, speculative, **kw).tokens
