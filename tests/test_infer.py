"""Inference: the latent cache, cached and speculative decoding against full forward passes, sampling."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, tiny_config

import deepseek_jax as dsj
import deepseek_jax.infer.decode as engine
from deepseek_jax import sharding
from deepseek_jax.infer import Sampling, cache_bytes_per_token, init_cache, mha_cache_bytes_per_token
from deepseek_jax.model import DeepSeekV3, abstract_params

LENGTHS = np.array([7, 3, 5, 1])


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return cfg, dsj.init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def small_vocab():
    """vocab 8: the random MTP module's drafts often agree with the main model, so speculation is exercised."""
    cfg = tiny_config(vocab_size=8)
    return cfg, dsj.init_params(cfg, jax.random.key(3))


def prompts_for(cfg, batch=4, length=7, seed=1):
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size))


def last_logits(cfg, params, seqs, width=24):
    """Full forward passes over the sequences, right-padded to one width (causal: padding is never seen)
    -> the logits at each sequence's last token."""
    padded = np.zeros((len(seqs), width), np.int32)
    for i, seq in enumerate(seqs):
        padded[i, :len(seq)] = seq
    logits = dsj.logits(cfg, params, jnp.asarray(padded))
    return logits[np.arange(len(seqs)), [len(seq) - 1 for seq in seqs]]


def argmax_loop(cfg, params, prompt, n):
    """The reference: n greedy tokens, each from a full forward pass over the whole sequence so far."""
    seq = [int(t) for t in prompt]
    for _ in range(n):
        seq.append(int(jnp.argmax(last_logits(cfg, params, [seq]))))
    return seq[len(prompt):]


def test_cached_greedy_equals_argmax_loop(model):
    cfg, params = model
    prompts = prompts_for(cfg)
    out = dsj.infer.complete(cfg, params, prompts, 9, lengths=LENGTHS)
    for b, n in enumerate(LENGTHS):
        assert out.completions[b].tolist() == argmax_loop(cfg, params, prompts[b, :n], 9)
    np.testing.assert_array_equal(out.tokens[:, :7], prompts)
    np.testing.assert_array_equal(out.tokens[:, 7:], out.completions)
    assert out.num_generated.tolist() == [9] * 4 and out.steps == 8


@pytest.mark.parametrize("name", ["v3_sigmoid_yarn", "v2_softmax_greedy", "v2_group_limited_yarn", "v3_fp8", "v32_dsa",
                                  "v32_fp8"])
def test_greedy_equals_transformers_generate(name):
    """transformers' greedy `generate` (its own KV cache) on the HF fixtures, prompts of lengths 5, 8, 3 in one
    ragged batch here (tests/fixtures/make_inference_fixtures.py; every top-1/top-2 logit gap >= 1.6e-3). The V3.2
    fixtures select 5 of up to 20 cached keys per step (DSA), from the indexer key cache."""
    path = os.path.join(FIXTURES, name)
    cfg, params = dsj.load_hf_checkpoint(path, dtype=jnp.float32)
    ref = np.load(os.path.join(path, "generate.npz"))
    spec = cfg.num_nextn_predict_layers > 0  # the V3 fixtures carry MTP weights: speculate with them too
    out = dsj.infer.complete(cfg, params, ref["prompts"], 12, lengths=ref["prompt_lengths"], speculative=spec)
    np.testing.assert_array_equal(out.completions, ref["greedy"])


def decode_two(cfg, params, form):
    """Prefill ragged prompts, then decode two new tokens per row against the cache."""
    m = DeepSeekV3(cfg.replace(decode_attention="naive" if form == "heads" else form))
    prompts = prompts_for(cfg, 3, 9)
    layout = "heads" if form == "heads" else "latent"

    @jax.jit
    def run(params, prompts):
        pos = jnp.broadcast_to(jnp.arange(9), (3, 9))
        cache = init_cache(cfg, 3, 40, layout=layout).layers
        _, caches = m.apply({"params": params}, prompts, pos, cache, 9, method=m.decode)
        new_pos = jnp.array([9, 4, 6])[:, None] + jnp.arange(2)
        h, _ = m.apply({"params": params}, jnp.array([[3, 4], [5, 6], [7, 8]]), new_pos, caches, 40,
                       method=m.decode)
        return m.apply({"params": params}, h, method=m.final_logits)

    return np.asarray(run(params, prompts)), prompts


@pytest.mark.parametrize("form", ["absorb", "pallas", "heads"])
def test_absorbed_decode_equals_naive_and_full_forward(model, form):
    """Latent-space attention (jnp, or the Pallas kernel in interpret mode) equals decompressing the latent cache
    per head, and MHA's per-head K/V cache; all equal a full forward pass over prompt + new tokens."""
    cfg, params = model
    naive, prompts = decode_two(cfg, params, "naive")
    out, _ = decode_two(cfg, params, form)
    np.testing.assert_allclose(out, naive, rtol=1e-4, atol=1e-5)
    for b, (n, new) in enumerate(zip([9, 4, 6], [[3, 4], [5, 6], [7, 8]], strict=True)):
        full = last_logits(cfg, params, [[*prompts[b, :n], *new[:1]], [*prompts[b, :n], *new]])
        np.testing.assert_allclose(out[b], full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_greedy_equals_plain_greedy(small_vocab, depth):
    cfg, params = small_vocab
    if depth != 1:
        cfg = cfg.replace(num_nextn_predict_layers=depth)
        params = dsj.init_params(cfg, jax.random.key(3))
    prompts = prompts_for(cfg)
    plain = dsj.infer.complete(cfg, params, prompts, 16, lengths=LENGTHS)
    spec = dsj.infer.complete(cfg, params, prompts, 16, lengths=LENGTHS, speculative=True)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    assert spec.accepted > 0 and spec.drafted >= depth * spec.steps  # drafts were checked and some accepted


def test_mtp_drafts_equal_full_forward_mtp(small_vocab):
    """After prefill and after every step, module 1's draft is the argmax of the training forward's MTP logits
    at the newest position: the MTP cache holds the same entries as a full pass."""
    cfg, params = small_vocab
    prompts = prompts_for(cfg)
    s = engine.Settings(cfg, 12, 7 + 12 + 1, Sampling(), speculative=True)
    state = engine._prefill(params, jnp.asarray(prompts), jnp.asarray(LENGTHS), jax.random.key(0), s)
    step = jax.jit(engine.step, static_argnames="s")
    for _ in range(4):
        for b, n in enumerate(LENGTHS):
            seq = [*prompts[b, :n], *np.asarray(state.out[b, :int(state.n_out[b])])]
            padded = jnp.asarray([seq + [0] * (24 - len(seq))])
            mtp = dsj.forward(cfg, params, padded).mtp_logits[0, 0]  # at i: t_{i+2} from h_i and t_{i+1}
            assert int(state.drafts[b, 0]) == int(jnp.argmax(mtp[len(seq) - 2]))
        state = step(params, state, s)


def exact_distribution(cfg, params, prompt, n, sampling):
    """P(t_1..t_n | prompt) for every continuation, from full forward passes with the same warping."""
    v = cfg.vocab_size
    probs = np.ones([1])
    conts = np.zeros((1, 0), np.int64)
    for _ in range(n):
        seqs = np.concatenate([np.repeat(prompt[None], len(conts), 0), conts], axis=1)
        p = np.asarray(dsj.infer.probabilities(last_logits(cfg, params, list(seqs), width=8), sampling))
        probs = (probs[:, None] * p).reshape(-1)
        conts = np.concatenate([np.repeat(conts, v, 0), np.tile(np.arange(v), len(conts))[:, None]], axis=1)
    return probs


def chi_square_ok(counts, expected):
    """Pearson chi-square below its 99.9% quantile (Wilson-Hilferty), cells with expected < 5 pooled."""
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    stat = float(np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-12)))
    df = len(obs) - 1
    return stat, df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("speculative", [False, True])
def test_sampled_tokens_follow_the_model_distribution(small_vocab, speculative):
    """Speculative sampling (accept min(1, p/q), else resample from the residual) samples exactly p: 3 tokens
    from 6000 rows against the exact joint distribution of the warped model, over 512 outcomes."""
    cfg, params = small_vocab
    sampling = Sampling(temperature=1.3, top_k=7, top_p=0.95)
    prompt = np.array([1, 5, 2])
    rows = 6000
    out = dsj.infer.complete(cfg, params, np.repeat(prompt[None], rows, 0), 3, sampling.temperature,
                             sampling.top_p, jax.random.key(7), speculative, top_k=sampling.top_k)
    codes = out.completions.astype(np.int64) @ (8 ** np.arange(2, -1, -1))
    counts = np.bincount(codes, minlength=512).astype(np.float64)
    stat, limit = chi_square_ok(counts, rows * exact_distribution(cfg, params, prompt, 3, sampling))
    assert stat < limit, f"chi-square {stat:.1f} >= {limit:.1f}"
    if speculative:
        assert 0.15 < out.acceptance_rate < 0.95, out.acceptance_rate  # both branches of the rule are taken


def test_the_distribution_test_detects_accepting_every_draft(small_vocab, monkeypatch):
    """The same check fails for a broken rule that keeps every draft: it samples the MTP's q, not p."""
    cfg, params = small_vocab
    sampling = Sampling(temperature=1.3, top_k=7, top_p=0.95)

    def accept_all(p, q, drafts, key, greedy=False):
        depth = drafts.shape[1]
        return jnp.full(drafts.shape[:1], depth, jnp.int32), engine.draw(p[:, depth], key)

    monkeypatch.setattr(engine, "speculative_accept", accept_all)
    prompt, rows = np.array([1, 5, 2]), 6000
    s = engine.Settings(cfg, 3, 7, sampling, True)
    state = jax.jit(engine._complete.__wrapped__, static_argnames="s")(  # traced afresh, with the broken rule
        params, jnp.asarray(np.repeat(prompt[None], rows, 0)), jnp.full((rows,), 3), jax.random.key(7), s)
    codes = np.asarray(state.out[:, :3]).astype(np.int64) @ (8 ** np.arange(2, -1, -1))
    counts = np.bincount(codes, minlength=512).astype(np.float64)
    stat, limit = chi_square_ok(counts, rows * exact_distribution(cfg, params, prompt, 3, sampling))
    assert stat > limit


def test_probabilities_match_numpy_warping():
    logits = jax.random.normal(jax.random.key(0), (5, 50)) * 3
    for temp, k, top_p in [(0.7, 0, 1.0), (1.0, 10, 1.0), (1.5, 0, 0.8), (1.0, 20, 0.5)]:
        got = np.asarray(dsj.infer.probabilities(logits, Sampling(temp, k, top_p)))
        for row, want_row in zip(np.asarray(logits, np.float64), got, strict=True):
            z = row / temp
            if k:
                z = np.where(z < np.sort(z)[-k], -np.inf, z)
            p = np.exp(z - z.max())
            p /= p.sum()
            order = np.argsort(-p)
            keep = np.zeros_like(p, bool)
            keep[order[: np.searchsorted(np.cumsum(p[order]), top_p) + 1]] = True
            p = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
            np.testing.assert_allclose(want_row, p, atol=1e-6)
    greedy = np.asarray(dsj.infer.probabilities(logits, Sampling()))
    np.testing.assert_array_equal(greedy.argmax(-1), np.asarray(logits).argmax(-1))
    assert (greedy.max(-1) == 1).all()


def test_greedy_shortcut_is_the_rule_on_one_hot_distributions():
    """With one-hot p and q the rule (u * q(x) < p(x), residual max(0, p - q)) is deterministic: accept while the
    draft is p's argmax, then p's argmax. The greedy shortcut must give exactly that."""
    logits = jax.random.normal(jax.random.key(0), (64, 3, 5))
    p = dsj.infer.probabilities(logits, Sampling())
    drafts = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.7, (64, 2)), jnp.argmax(logits[:, :2], -1),
                       jax.random.randint(jax.random.key(2), (64, 2), 0, 5))
    q = jax.nn.one_hot(drafts, 5)
    rule = dsj.infer.speculative_accept(p, q, drafts, jax.random.key(3))
    shortcut = dsj.infer.speculative_accept(p, q, drafts, jax.random.key(3), greedy=True)
    for a, b in zip(rule, shortcut, strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(np.asarray(rule[0]).tolist()) == {0, 1, 2}


def test_sampling_is_reproducible_from_its_key(model):
    cfg, params = model
    prompts = prompts_for(cfg)
    a, b, c = (dsj.generate(cfg, params, prompts, 8, 1.0, 0.9, jax.random.key(s), lengths=LENGTHS)
               for s in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_rows_stop_at_eos_independently(model):
    cfg, params = model
    prompts = prompts_for(cfg)
    greedy = dsj.infer.complete(cfg, params, prompts, 10, lengths=LENGTHS).completions
    eos = int(greedy[0, 3])  # row 0 emits it at step 4; other rows wherever it first appears, if at all
    out = dsj.infer.complete(cfg, params, prompts, 10, lengths=LENGTHS, eos_id=eos, pad_id=-1)
    for b in range(4):
        hits = np.flatnonzero(greedy[b] == eos)
        n = hits[0] + 1 if len(hits) else 10
        assert out.num_generated[b] == n
        np.testing.assert_array_equal(out.completions[b, :n], greedy[b, :n])
        assert (out.completions[b, n:] == -1).all()
    assert out.done.all()


@pytest.mark.parametrize("speculative", [False, True])
def test_rows_stop_after_a_stop_sequence(small_vocab, speculative):
    """A multi-token stop sequence ends a row right after its first occurrence in the generated tokens, also when
    a speculative step emits several tokens at once."""
    cfg, params = small_vocab
    prompts = prompts_for(cfg)
    greedy = dsj.infer.complete(cfg, params, prompts, 14, lengths=LENGTHS).completions
    stop = [int(greedy[1, 4]), int(greedy[1, 5])]
    out = dsj.infer.complete(cfg, params, prompts, 14, lengths=LENGTHS, stop=[stop], pad_id=-1,
                             speculative=speculative)
    for b in range(4):
        ends = [i + 2 for i in range(13) if greedy[b, i:i + 2].tolist() == stop]
        n = ends[0] if ends else 14
        assert out.num_generated[b] == n
        np.testing.assert_array_equal(out.completions[b, :n], greedy[b, :n])
        assert (out.completions[b, n:] == -1).all()


def test_stream_yields_the_same_tokens_in_chunks(small_vocab):
    cfg, params = small_vocab
    prompts = prompts_for(cfg)
    whole = dsj.infer.complete(cfg, params, prompts, 12, lengths=LENGTHS, speculative=True)
    parts = list(dsj.infer.stream(cfg, params, prompts, 12, lengths=LENGTHS, speculative=True, chunk=3))
    assert len(parts) > 2 and all(np.diff([p.num_generated.sum() for p in parts]) > 0)
    np.testing.assert_array_equal(parts[-1].tokens, whole.tokens)
    assert parts[-1].acceptance_rate == whole.acceptance_rate


def test_sharded_generation_equals_single_device(small_vocab):
    """Params sharded by the training rules on data2 x expert2 x tensor2 (heads over tensor, experts over expert),
    rows over the batch axes: the same tokens as one device, greedy speculative and sampled plain."""
    cfg, params = small_vocab
    prompts = prompts_for(cfg, batch=6)  # not a multiple of the 4 batch shards: padded inside
    lengths = np.array([7, 3, 5, 1, 6, 2])
    kw = dict(lengths=lengths, rng=jax.random.key(2))
    runs = [(0.0, True), (1.0, False)]
    want = [dsj.generate(cfg, params, prompts, 8, t, speculative=s, **kw) for t, s in runs]
    mesh = sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2})
    sharded = jax.device_put(params, sharding.logical_shardings(mesh, abstract_params(cfg)))
    assert sharded["layers_1"]["mlp"]["experts"]["gate"].sharding.spec[1] == "expert"
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        got = [dsj.generate(cfg, sharded, prompts, 8, t, speculative=s, **kw) for t, s in runs]
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(g, w)


def test_cache_holds_only_the_latent_and_rope_key():
    """V3 671B: (512 + 64) x 61 layers x 2 bytes = 70,272 B/token (+ the MTP module's 1,152), vs MHA 4,997,120."""
    v3 = dsj.ModelConfig()
    assert cache_bytes_per_token(v3, jnp.bfloat16, mtp=False) == 70_272
    assert cache_bytes_per_token(v3, jnp.bfloat16) <= 1.02 * 70_272
    assert mha_cache_bytes_per_token(v3, jnp.bfloat16) == 4_997_120
    cache = jax.eval_shape(lambda: init_cache(v3, 2, 16, jnp.bfloat16))
    assert [x.shape for x in jax.tree_util.tree_leaves(cache.layers[1])] == [(58, 2, 16, 512), (58, 2, 16, 64)]
    assert cache.lengths.shape == (2,)


def test_v32_cache_adds_the_indexer_key():
    """V3.2 671B: + 128 indexer values per token per layer: (576 + 128) x 61 x 2 = 85,888 B/token in bf16; with
    the FP8 indexer key cache (E4M3 codes + one float32 scale) 61 x (1,152 + 128 + 4) = 78,324."""
    v32 = dsj.ModelConfig(index_n_heads=64, model_type="deepseek_v32")
    assert cache_bytes_per_token(v32, jnp.bfloat16, mtp=False) == 85_888
    assert cache_bytes_per_token(v32.replace(dsa_fp8_indexer=True), jnp.bfloat16, mtp=False) == 78_324
    cache = jax.eval_shape(lambda: init_cache(v32.replace(dsa_fp8_indexer=True), 2, 16, jnp.bfloat16))
    assert cache.layers[1].index_k.shape == (58, 2, 16, 128) and cache.layers[1].index_k.dtype == jnp.float8_e4m3fn
    assert cache.layers[1].index_scale.shape == (58, 2, 16, 1)


def test_bad_requests_fail_clearly(model):
    cfg, params = model
    prompts = prompts_for(cfg)
    with pytest.raises(ValueError, match="max_len=8"):
        dsj.infer.complete(cfg, params, prompts, 4, max_len=8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dsj.generate(cfg, params, prompts, cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        dsj.generate(cfg.replace(num_nextn_predict_layers=0), params, prompts, 4, speculative=True)
    with pytest.raises(ValueError, match="lengths"):
        dsj.generate(cfg, params, prompts, 4, lengths=[8, 1, 1, 1])
    with pytest.raises(ValueError, match="vocab_size"):
        dsj.generate(cfg, params, prompts + cfg.vocab_size, 4)
