"""Data pipeline: default corpus, tokenizer, packing, resume, sharding, splits and bad data."""

import json
import pickle
import random

import numpy as np
import pytest

from deepseek_jax.data import DataError, default_documents, load_or_train_tokenizer, make_iterator, source_documents
from deepseek_jax.data.pipeline import EVAL_EVERY

VOCAB = 512
SEQ, BATCH = 32, 4
WORDS = ("alpha beta gamma delta kernel tensor shard mesh expert router token layer norm rotary cache "
         "latent query value key attention loss gradient step batch").split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_or_train_tokenizer(None, VOCAB, cache_dir=str(tmp_path_factory.mktemp("cache")))


def make_texts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {k}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for k in range(n)]


@pytest.fixture
def jsonl(tmp_path):
    texts = make_texts(60)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return str(path), texts


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def flat(batches: list[dict], key: str) -> np.ndarray:
    return np.concatenate([b[key].reshape(-1) for b in batches])


def split_at_eos(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    """Complete documents (each ending with eos) in a token stream; a trailing partial one is dropped."""
    docs, start = [], 0
    for i in np.flatnonzero(tokens == eos):
        docs.append(tuple(tokens[start:i + 1].tolist()))
        start = i + 1
    return docs


def encoded(tok, texts: list[str]) -> list[tuple[int, ...]]:
    return [(*tok.encode(t), tok.eos_id) for t in texts]


def check_rows(batch: dict, eos: int) -> None:
    """Independent packing invariants: a new segment starts exactly after an eos (or at a row start),
    segments count 1, 2, ... per row, positions count from 0 within each segment, no padding."""
    tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
    assert tokens.dtype == seg.dtype == pos.dtype == np.int32
    for t, s, p in zip(tokens, seg, pos, strict=True):
        starts = np.r_[True, t[:-1] == eos]
        np.testing.assert_array_equal(s, np.cumsum(starts))
        seg_start = np.maximum.accumulate(np.where(starts, np.arange(len(t)), 0))
        np.testing.assert_array_equal(p, np.arange(len(t)) - seg_start)
        assert (s > 0).all()  # rows are always full; 0 would be padding


def test_default_corpus_is_embedded_and_deterministic():
    docs = default_documents()
    assert sum(map(len, docs)) > 300_000 and len(docs) > 100
    assert all(d.strip() for d in docs)
    assert docs == default_documents()


def test_tokenizer_round_trip_special_ids_and_cache(tok, tmp_path_factory):
    assert (tok.vocab_size, tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (VOCAB, 0, 1, 2, 3)
    samples = [*default_documents()[::50], "  two  spaces\n\ttab\r\nünïcödé ✓ 日本語 🙂 \x00 end\n"]
    for s in samples:
        ids = tok.encode(s)
        assert 3 not in ids and tok.decode(ids) == s
    again = load_or_train_tokenizer(None, VOCAB, cache_dir=tok.path.rsplit("/tokenizers/", 1)[0])
    assert again.path == tok.path and again.encode(samples[0]) == tok.encode(samples[0])
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(samples[-1]) == tok.encode(samples[-1])


def test_tokenizer_from_path_and_its_errors(tok, tmp_path):
    assert load_or_train_tokenizer(tok.path, VOCAB).encode("hello") == tok.encode("hello")
    with pytest.raises(DataError, match=r"has 512 pieces but model.vocab_size=1024; set model.vocab_size=512"):
        load_or_train_tokenizer(tok.path, 1024)
    missing = str(tmp_path / "nope.model")
    with pytest.raises(DataError, match=f"{missing} cannot be read"):
        load_or_train_tokenizer(missing, VOCAB)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        load_or_train_tokenizer(str(bad), VOCAB)
    with pytest.raises(DataError, match="at most"):
        load_or_train_tokenizer(None, 10**6, documents_fn=lambda: ["tiny corpus"], cache_dir=str(tmp_path))


def test_packing_reconstructs_one_shuffled_epoch(tok, jsonl):
    path, texts = jsonl
    it = make_iterator(path, tok, seq_len=SEQ, global_batch_size=16, seed=0)
    batches = take(it, 40)
    for b in batches:
        assert b["tokens"].shape == (16, SEQ)
        check_rows(b, tok.eos_id)
    train = [t for i, t in enumerate(texts) if i % EVAL_EVERY]
    docs = split_at_eos(flat(batches, "tokens"), tok.eos_id)
    assert len(docs) > 2 * len(train)
    expected = encoded(tok, train)
    epoch1, epoch2 = docs[:len(train)], docs[len(train):2 * len(train)]
    assert sorted(epoch1) == sorted(expected) == sorted(epoch2)
    assert epoch1 != expected and epoch1 != epoch2  # shuffled, differently each epoch
    assert any(len(d) > SEQ for d in expected)  # long documents were split across rows
    other = split_at_eos(flat(take(make_iterator(path, tok, seq_len=SEQ, global_batch_size=16, seed=1), 20),
                              "tokens"), tok.eos_id)
    assert other[:len(train)] != epoch1
    assert it.stats.docs_in_split == len(train) and it.stats.docs_read >= 2 * len(train)


def test_eval_split_is_held_out_in_order_and_repeats(tok, jsonl):
    path, texts = jsonl
    held = [t for i, t in enumerate(texts) if i % EVAL_EVERY == 0]
    held_tokens = sum(map(len, encoded(tok, held)))
    with pytest.warns(UserWarning, match="less than one batch"):
        it = make_iterator(path, tok, seq_len=SEQ, global_batch_size=64, seed=0, split="eval")
    assert held_tokens < 64 * SEQ
    batches = take(it, 3)
    for b in batches:
        check_rows(b, tok.eos_id)
    docs = split_at_eos(flat(batches, "tokens"), tok.eos_id)
    assert docs[:2 * len(held)] == encoded(tok, held) * 2  # fixed order, every pass the same
    train = split_at_eos(flat(take(make_iterator(path, tok, seq_len=SEQ, global_batch_size=BATCH, seed=0), 40),
                              "tokens"), tok.eos_id)
    assert not set(train) & set(encoded(tok, held))
    e1 = take(make_iterator("default", tok, seq_len=64, global_batch_size=2, seed=0, split="eval"), 2)
    e2 = take(make_iterator("default", tok, seq_len=64, global_batch_size=2, seed=5, split="eval"), 2)
    for a, b in zip(e1, e2, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


@pytest.mark.parametrize("split", ["train", "eval"])
def test_resume_gives_exactly_the_same_batches(tok, jsonl, split):
    path, _ = jsonl
    kw = dict(seq_len=SEQ, global_batch_size=BATCH, seed=3, split=split)
    if split == "eval":
        kw["global_batch_size"] = 1
    for n in (0, 1, 7, 60):  # 60 crosses into the second epoch
        it = make_iterator(path, tok, **kw)
        take(it, n)
        state = json.loads(json.dumps(it.get_state()))
        assert state == it.get_state()
        rest = take(it, 12)
        fresh = make_iterator(path, tok, **kw)
        fresh.set_state(state)
        for a, b in zip(rest, take(fresh, 12), strict=True):
            for key in ("tokens", "segment_ids", "positions"):
                np.testing.assert_array_equal(a[key], b[key])


def test_processes_split_the_same_global_batches(tok, jsonl):
    """Process p of P gets rows [p*B/P, (p+1)*B/P) of the batch a single process would see."""
    path, _ = jsonl
    kw = dict(seq_len=SEQ, global_batch_size=2 * BATCH, seed=0)
    whole = take(make_iterator(path, tok, **kw), 6)
    parts = [take(make_iterator(path, tok, **kw, process_index=p, process_count=2), 6) for p in (0, 1)]
    for w, a, b in zip(whole, *parts, strict=True):
        assert a["tokens"].shape == (BATCH, SEQ)
        for key in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), w[key])
    # one state restores any process, and a resume on another process count continues the same stream
    it = make_iterator(path, tok, **kw, process_index=0, process_count=2)
    take(it, 3)
    state = it.get_state()
    single = make_iterator(path, tok, **kw)
    single.set_state(state)
    np.testing.assert_array_equal(next(single)["tokens"], whole[3]["tokens"])
    with pytest.raises(DataError, match="global_batch_size=6 must be divisible by process_count=4"):
        make_iterator(path, tok, seq_len=SEQ, global_batch_size=6, seed=0, process_count=4)


def test_empty_files_are_skipped_with_a_warning(tok, tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(make_texts(40, seed=1)))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.warns(UserWarning) as record:
        it = make_iterator(str(tmp_path), tok, seq_len=SEQ, global_batch_size=BATCH, seed=0)
    assert sorted(str(w.message).rsplit("/", 1)[1] for w in record) == ["blank.jsonl", "empty.txt"]
    assert it.stats.empty_files_skipped == 2 and it.stats.files == 3
    check_rows(next(it), tok.eos_id)

    only_empty = tmp_path / "empty"
    only_empty.mkdir()
    (only_empty / "x.txt").write_text("")
    (only_empty / "y.jsonl").write_text("")
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"every file .* is empty"):
        make_iterator(str(only_empty), tok, seq_len=SEQ, global_batch_size=BATCH, seed=0)
    with pytest.raises(DataError, match="nothing-here"):
        make_iterator(str(tmp_path / "nothing-here*.txt"), tok, seq_len=SEQ, global_batch_size=BATCH, seed=0)
    with pytest.raises(DataError, match="does not exist"):
        make_iterator(str(tmp_path / "missing.jsonl"), tok, seq_len=SEQ, global_batch_size=BATCH, seed=0)


def test_bad_utf8_and_bad_json_lines_are_skipped_and_counted(tok, tmp_path):
    texts = make_texts(45, seed=2)
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"good first line\n\xff\xfe broken line\n" + "\n\n".join(texts).encode())
    jl = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in texts]
    lines[3] = b'{"text": "caf\xe9"}'  # latin-1, not UTF-8
    lines[5] = b"{not json"
    lines[7] = b'{"id": 7}'
    jl.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.warns(UserWarning) as record:
        it = make_iterator(f"{txt},{jl}", tok, seq_len=SEQ, global_batch_size=BATCH, seed=0)
    messages = [str(w.message) for w in record]
    assert any("bad.txt" in m and "not valid UTF-8: line 2" in m for m in messages)
    assert any("bad.jsonl" in m and "not valid UTF-8: line 4" in m for m in messages)
    assert any("bad.jsonl" in m and "lines 6, 8" in m for m in messages)
    assert (it.stats.bad_utf8_skipped, it.stats.bad_json_skipped) == (2, 2)
    check_rows(next(it), tok.eos_id)
    with pytest.warns(UserWarning):
        docs = list(source_documents(str(txt)))
    assert "broken" not in "".join(docs) and docs[0].startswith("good first line\n" + texts[0])


def test_too_small_corpus_names_the_numbers(tok, tmp_path):
    path = tmp_path / "small.jsonl"
    texts = make_texts(5, seed=3)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    have = sum(map(len, encoded(tok, texts[1:])))
    with pytest.raises(DataError, match=rf"has {have} tokens \(4 documents\) but one batch needs {64 * 128} "
                                        r"\(seq_len 128 x 64 rows\); use a smaller"):
        make_iterator(str(path), tok, seq_len=128, global_batch_size=64, seed=0)


def test_array_record_source(tok, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    texts = make_texts(41, seed=4)
    w = ArrayRecordWriter(str(tmp_path / "a.array_record"), "group_size:1")
    for i, t in enumerate(texts):
        w.write(json.dumps({"text": t}).encode() if i % 2 else t.encode())
    w.write(b"\xff bad record")
    w.close()
    ArrayRecordWriter(str(tmp_path / "b.array_record"), "group_size:1").close()
    with pytest.warns(UserWarning, match=r"skipped empty file .*b.array_record"):
        it = make_iterator(str(tmp_path / "*.array_record"), tok, seq_len=SEQ, global_batch_size=16, seed=0)
    with pytest.warns(UserWarning, match=r"record 41 of .*a.array_record"):
        batches = take(it, 20)
    docs = split_at_eos(flat(batches, "tokens"), tok.eos_id)
    train = encoded(tok, [t for i, t in enumerate(texts) if i % EVAL_EVERY])
    assert sorted(docs[:len(train)]) == sorted(train)
    assert (it.stats.bad_utf8_skipped, it.stats.empty_files_skipped) == (1, 1)

    w = ArrayRecordWriter(str(tmp_path / "bad.array_record"), "group_size:1")
    for _ in range(30):
        w.write(b"\xff\xfe")
    w.close()
    with pytest.raises(DataError, match="has 0 tokens"):  # not an endless search for a good record
        make_iterator(str(tmp_path / "bad.array_record"), tok, seq_len=SEQ, global_batch_size=BATCH, seed=0)
