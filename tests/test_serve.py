"""The serving engine (continuous batching, paged cache, prefix caching) and the OpenAI HTTP API, driven with the
official `openai` client against a server on 127.0.0.1."""

import os
import shutil
import socket
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn
from conftest import FIXTURES, tiny_config

import deepseek_jax as dsj
from deepseek_jax.data import HFTokenizer
from deepseek_jax.infer.sampling import Sampling, probabilities, row_probabilities
from deepseek_jax.serve import Engine, PagePool, SamplingParams, page_hashes
from deepseek_jax.serve.api import TextStream, create_app
from launch import generate, serve

TOKENIZER = os.path.join(FIXTURES, "tokenizer")
PAGE, MAX_LEN, CHUNK = 16, 128, 32


def reference(cfg, params, prompts, n, speculative=False):
    """What the static-batch generator (infer.complete) makes of the prompts, in one right-padded batch: each
    one's greedy n tokens (and, speculative, the drafts it accepted in all)."""
    lengths = [len(p) for p in prompts]
    batch = np.array([p + [0] * (max(lengths) - len(p)) for p in prompts])
    got = dsj.infer.complete(cfg, params, batch, n, lengths=lengths, speculative=speculative)
    tokens = [got.completions[i, :got.num_generated[i]].tolist() for i in range(len(prompts))]
    return (tokens, got.accepted) if speculative else tokens


# -- pages and sampling, against plain-python and single-row references ------------------------------------------

def test_page_pool_prefix_cache_and_lru_eviction():
    pool = PagePool(4, 2)
    a = [1, 2, 3, 4, 5]
    pages = pool.allocate(3)
    for page, key in zip(pages, page_hashes(a, 2), strict=False):
        pool.publish(page, key)  # pages [1 2] [3 4] are full; [5] is not
    assert len(page_hashes(a, 2)) == 2 and pool.used == 3
    assert pool.match([1, 2, 3, 4, 9]) == pages[:2]  # same prefix: both full pages are shared
    assert pool.match([1, 2, 3]) == pages[:1]  # the last token is never matched
    assert pool.match([7, 2, 3, 4, 5]) == []  # the chain: page 2 alone does not match after another page 1
    assert pool.refs[pages[0]] == 3 and pool.hits == 3
    pool.release(pages + pages[:2] + pages[:1])
    assert pool.used == 0 and pool.available == 4 and pool.refs == [0] * 4
    # the unpublished page went back to the free list; the cached ones are evicted oldest-released first
    fresh = pool.allocate(2)
    assert pages[2] in fresh and pool.match(a) == pages[:2]  # the free page was taken before any cached one
    pool.release(pages[:2])
    assert pool.allocate(3) is None  # only 2 left: nothing taken
    took = pool.allocate(1)
    assert took == [pages[0]] and pool.match(a) == []  # LRU: [1 2] went first, which breaks the chain
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([pages[2], pages[2], pages[2]])


def test_row_probabilities_equal_the_static_sampler_row_by_row():
    logits = jax.random.normal(jax.random.key(1), (5, 40)) * 3
    settings = [Sampling(0.0), Sampling(1.0), Sampling(0.7, top_k=5), Sampling(1.3, top_p=0.6),
                Sampling(0.5, top_k=3, top_p=0.9)]
    got = row_probabilities(logits, jnp.array([s.temperature for s in settings]),
                            jnp.array([s.top_k for s in settings]), jnp.array([s.top_p for s in settings]))
    for row, s in enumerate(settings):
        np.testing.assert_allclose(got[row], probabilities(logits[row], s), atol=1e-6)
    assert int(jnp.sum(got[2] > 0)) == 5 and float(got[0].max()) == 1.0


def test_text_stream_cuts_at_a_stop_string_split_over_tokens():
    tok = HFTokenizer.from_dir(TOKENIZER)
    ids = tok.encode("hello world. stop here")
    stream = TextStream(tok, ["d. st"], tok.eos_id)
    out, hit = "", False
    for i in ids:
        delta, hit = stream.push([i])
        out += delta
        if hit:
            break
    assert hit and out == "hello worl"
    plain = TextStream(tok, [], tok.eos_id)
    assert plain.push([*ids, tok.eos_id], final=True) == ("hello world. stop here", False)


# -- the engine -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(vocab_size=HFTokenizer.from_dir(TOKENIZER).vocab_size, max_position_embeddings=256)
    return cfg, dsj.init_params(cfg, jax.random.key(0))


def test_engine_greedy_equals_static_generation_under_preemption_and_cancels(model):
    """Paged cache, chunked prefill, prefix sharing and recompute preemption change no token: every finished
    request matches infer.complete, and afterwards every page is free and no program was compiled twice."""
    cfg, params = model
    rng = np.random.default_rng(0)
    system = rng.integers(3, cfg.vocab_size, 40).tolist()
    prompts = [(system if i % 3 == 0 else []) + rng.integers(3, cfg.vocab_size, n).tolist()
               for i, n in enumerate(rng.integers(1, 60, 12))]
    engine = Engine(cfg, params, max_batch=4, max_len=MAX_LEN, page_size=PAGE, chunk=CHUNK, num_pages=12)
    programs = engine.warmup()
    # page buckets 1 2 4 8 x (prefill chunks 16 32, decode rows 1 2 4)
    assert programs == 4 * (2 + 3) and engine.compiled() == programs
    requests = engine.generate(prompts, SamplingParams(max_tokens=20))
    assert engine.preemptions > 0  # 12 pages for 4 rows of up to 80 tokens: rows were recomputed
    assert engine.pages.hits > 0  # the shared system prompt
    assert [r.output for r in requests] == reference(cfg, params, prompts, 20)
    assert all(r.finish_reason == "length" for r in requests)
    assert engine.pages.used == 0 and engine.running == [] and not engine.waiting

    # 200 random requests, some cancelled while queued or running, some sampled with seeds
    live = []
    for i in range(200):
        prompt = rng.integers(3, cfg.vocab_size, rng.integers(1, 90)).tolist()
        params_i = SamplingParams(float(rng.choice([0.0, 0.8])), max_tokens=int(rng.integers(1, 12)), seed=i)
        live.append(engine.submit(prompt, params_i))
        if i % 7 == 3:
            engine.cancel(live[rng.integers(len(live))])
        if i % 5 == 0:
            for _ in range(rng.integers(1, 6)):
                engine.step()
    while not engine.idle:
        engine.step()
    assert all(r.done for r in live) and any(r.finish_reason == "cancelled" for r in live)
    assert engine.pages.used == 0 and all(ref == 0 for ref in engine.pages.refs)
    assert engine.table.min() == engine.pages.num_pages  # no row points at a page
    assert engine.compiled() == programs, "a request compiled a new program"

    # the same seed samples the same tokens alone (in the idle engine) as in the crowd
    sampled = next(r for r in live if r.params.temperature > 0 and r.finish_reason == "length")
    alone = engine.generate([sampled.prompt], sampled.params)[0]
    assert alone.output == sampled.output
    queued = [engine.submit(p, SamplingParams(max_tokens=5)) for p in prompts[:6]]  # 4 run, 2 wait
    engine.step()
    engine.cancel_all()
    assert all(r.finish_reason == "cancelled" for r in queued) and engine.idle and engine.pages.used == 0
    engine.close()
    assert engine.compiled() == 0  # its programs are released


def test_speculative_batch_keeps_greedy_tokens_and_counts_acceptance(model):
    """MTP drafts verified inside the batch: the greedy tokens of infer.complete, and as many drafts accepted as
    complete(speculative=True) accepts for the same prompts."""
    cfg, params = model
    prompts = [list(range(3, 40)), [7, 8, 9], list(range(50, 70))]
    engine = Engine(cfg, params, max_batch=2, max_len=MAX_LEN, page_size=PAGE, chunk=CHUNK, speculative=True)
    want, accepted = reference(cfg, params, prompts, 14, speculative=True)
    assert [r.output for r in engine.generate(prompts, SamplingParams(max_tokens=14))] == want
    assert want == reference(cfg, params, prompts, 14)  # which is plain greedy decoding
    assert engine.accepted == accepted and engine.drafted >= engine.accepted
    engine.close()
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        Engine(cfg.replace(num_nextn_predict_layers=0), params, speculative=True)


def test_engine_v32_sparse_attention_over_pages():
    """DSA's indexer keys live in the pages too: a V3.2 model with top-k 4 decodes as infer.complete does."""
    cfg = tiny_config(max_position_embeddings=256, index_n_heads=2, index_head_dim=16, index_topk=4)
    params = dsj.init_params(cfg, jax.random.key(2))
    prompts = [list(range(5, 30)), list(range(40, 43))]
    engine = Engine(cfg, params, max_batch=2, max_len=64, page_size=PAGE, chunk=CHUNK)
    assert [r.output for r in engine.generate(prompts, SamplingParams(max_tokens=8))] == reference(cfg, params,
                                                                                                   prompts, 8)
    engine.close()


# -- HTTP -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, model):
    cfg, params = model
    path = tmp_path_factory.mktemp("hf") / "tiny-v3"
    dsj.export_hf_checkpoint(cfg, params, path, dtype=jnp.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, name), path)
    return str(path)


@pytest.fixture(scope="module")
def server(hf_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = serve.parse_args(["--hf_dir", hf_dir, "--max_batch", "4", "--max_len", str(MAX_LEN), "--page_size",
                             str(PAGE), "--chunk", str(CHUNK)])
    engine, tokenizer, name = serve.build(args)
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, name), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "name": name,
           "client": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)}
    srv.should_exit = True
    thread.join()
    engine.close()


def wait_idle(engine, timeout=30.0):
    deadline = time.time() + timeout
    while not engine.idle and time.time() < deadline:
        time.sleep(0.02)
    return engine.idle


def test_greedy_text_equals_launch_generate_for_completions_and_chat(server, hf_dir, capsys):
    import json
    client = server["client"]
    assert [m.id for m in client.models.list().data] == ["tiny-v3"]
    for chat in (False, True):
        generate.main(["--hf_dir", hf_dir, "--prompt", "Why is the sky", "--max_new_tokens", "12", "--format=jsonl"]
                      + (["--chat"] if chat else []))
        want = json.loads(capsys.readouterr().out.splitlines()[0])
        if chat:
            got = client.chat.completions.create(model="tiny-v3", messages=[{"role": "user", "content":
                                                 "Why is the sky"}], max_tokens=12, temperature=0)
            text = got.choices[0].message.content
            assert got.choices[0].message.role == "assistant"
        else:
            got = client.completions.create(model="tiny-v3", prompt="Why is the sky", max_tokens=12, temperature=0)
            text = got.choices[0].text
        assert text == want["completion"]
        assert got.usage.prompt_tokens == len(want["prompt_token_ids"])
        assert got.usage.completion_tokens == len(want["completion_token_ids"])
        assert got.choices[0].finish_reason == ("stop" if want["completion_token_ids"][-1:] == [1] else "length")


def test_streamed_deltas_equal_the_whole_text(server):
    client = server["client"]
    kw = dict(model="tiny-v3", prompt="Once upon", max_tokens=20, temperature=0.9, seed=3)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].usage.completion_tokens > 0
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny-v3", messages=msgs, max_tokens=10, temperature=0)
    streamed = client.chat.completions.create(model="tiny-v3", messages=msgs, max_tokens=10, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    with httpx.stream("POST", server["url"] + "/v1/completions", json={**kw, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings_end_the_text_before_them(server):
    client = server["client"]
    whole = client.completions.create(model="tiny-v3", prompt="The", max_tokens=20, temperature=0).choices[0].text
    stop = whole[5:8]
    cut = client.completions.create(model="tiny-v3", prompt="The", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[:whole.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_match_alone_and_a_short_one_overtakes(server):
    client, engine = server["client"], server["engine"]
    prompts = ["a b c", "The quick brown fox", "1 2 3 4 5 6", "hello"]
    alone = [client.completions.create(model="tiny-v3", prompt=p, max_tokens=15, temperature=0).choices[0].text
             for p in prompts]
    together, done_at = [None] * 4, {}

    def ask(i, prompt, n):
        out = client.completions.create(model="tiny-v3", prompt=prompt, max_tokens=n, temperature=0)
        done_at[i] = time.perf_counter()
        return out.choices[0].text

    threads = [threading.Thread(target=lambda i=i, p=p: together.__setitem__(i, ask(i, p, 15)))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    # a long request is running when a short one arrives; the short one finishes first
    long = threading.Thread(target=ask, args=("long", "x y z", 100))
    long.start()
    while not engine.running:
        time.sleep(0.005)
    ask("short", "hello", 3)
    long.join()
    assert done_at["short"] < done_at["long"]
    assert wait_idle(engine) and engine.pages.used == 0


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    client, url = server["client"], server["url"]
    ok = dict(model="tiny-v3", prompt="hi", max_tokens=2)
    for bad, param in ((dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
                       (dict(top_p=1.5), "top_p"), (dict(max_tokens=0), "max_tokens"),
                       (dict(prompt="word " * 200), "prompt")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**(ok | bad))
        assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(**(ok | dict(model="gpt-5")))
    assert e.value.body["code"] == "model_not_found"
    for body in ('{"model": "tiny-v3", "prompt": ', '{"model": "tiny-v3"}', '[1, 2]',
                 '{"model": "tiny-v3", "prompt": "hi", "max_tokens": "many"}'):
        r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny-v3", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert client.completions.create(**ok).choices[0].text is not None
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_disconnect_mid_stream_frees_the_slot_and_pages(server):
    engine = server["engine"]
    body = {"model": "tiny-v3", "prompt": "Tell me a long story", "max_tokens": 100, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
        assert engine.running
    assert wait_idle(engine) and engine.pages.used == 0
    cancelled = [line for line in httpx.get(server["url"] + "/metrics").text.splitlines()
                 if line.startswith('deepseek_requests_total{finish_reason="cancelled"}')]
    assert cancelled and float(cancelled[0].split()[-1]) >= 1


def test_metrics_count_prefix_hits_and_time_to_first_token(server):
    client, url = server["client"], server["url"]
    system = "You are a helpful assistant. " * 6  # several full pages
    before = _metric(httpx.get(url + "/metrics").text, "deepseek_prefix_cache_hits_total")
    for question in ("What is 2 + 2?", "Name a colour."):
        client.chat.completions.create(model="tiny-v3", max_tokens=2, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": question}])
    text = httpx.get(url + "/metrics").text
    assert _metric(text, "deepseek_prefix_cache_hits_total") - before >= 2
    assert _metric(text, "deepseek_time_to_first_token_seconds_count") >= 2
    assert _metric(text, "deepseek_cache_pages_total") == server["engine"].pages.num_pages


def _metric(text, name):
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
