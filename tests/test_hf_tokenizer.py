"""HFTokenizer and StreamDecoder against references recorded with transformers 5.24 (tests/fixtures/hf/tokenizer)."""

import json
import os
import random
import shutil

import pytest

from deepseek_jax.data import DataError, load_or_train_tokenizer
from deepseek_jax.data.hf_tokenizer import HFTokenizer, StreamDecoder

TOK_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "tokenizer")
with open(os.path.join(TOK_DIR, "reference.json"), encoding="utf-8") as _f:
    REF = json.load(_f)

STREAM_TEXTS = [
    "Crème brûlée — naïve café. 深度求索：你好，世界！ Emoji 🎉🚀 👩‍💻 🇫🇷 done.",
    "ASCII only, with  double spaces\tand tabs\n\nand newlines.",
    "😀😃😄😁 mixed ¿Qué tal? Ünïcödé ✓ ∑ ∞ 日本語のテキスト",
]


@pytest.fixture(scope="module")
def tok():
    return HFTokenizer.from_dir(TOK_DIR)


@pytest.fixture(scope="module")
def spm_tok():
    return load_or_train_tokenizer(None, 512)


def test_special_ids_and_sizes(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (REF["bos_token_id"], REF["eos_token_id"], REF["pad_token_id"])
    assert tok.vocab_size == REF["len"]


@pytest.mark.parametrize("case", REF["prompts"], ids=lambda c: repr(c["text"])[:24])
def test_encode_matches_transformers(tok, case):
    assert tok.encode(case["text"], add_special_tokens=True) == case["input_ids"]
    assert tok.encode(case["text"]) == case["input_ids_no_special"]
    assert tok.decode(case["input_ids"]) == case["decode"]
    assert tok.decode(case["input_ids"], skip_special_tokens=True) == case["decode_skip_special"]
    assert tok.decode(tok.encode(case["text"])) == case["text"]


@pytest.mark.parametrize("variant", REF["variants"], ids=lambda v: v["name"])
def test_post_processor_decides_bos(tmp_path, variant):
    """transformers 5.x adds what tokenizer.json's post-processor adds; add_bos_token in the config is ignored."""
    tok = HFTokenizer.from_dir(_make_variant(tmp_path, variant))
    assert [tok.encode(c["text"], add_special_tokens=True) for c in REF["prompts"]] == variant["input_ids"]


def _make_variant(tmp_path, variant) -> str:
    """The variant directory, built exactly as make_inference_fixtures.make_variant builds it."""
    with open(os.path.join(TOK_DIR, "tokenizer.json"), encoding="utf-8") as f:
        tok_json = json.load(f)
    if variant["post_processor"] != "keep":
        tok_json["post_processor"] = variant["post_processor"]
    with open(os.path.join(TOK_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for key, value in variant["config_update"].items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return str(tmp_path)


@pytest.mark.parametrize("conv", REF["conversations"], ids=lambda c: c["name"])
def test_chat_template_matches_transformers(tok, conv):
    text = tok.apply_chat_template(conv["messages"], add_generation_prompt=conv["add_generation_prompt"])
    assert text == conv["text"]
    assert tok.encode(text, add_special_tokens=False) == conv["input_ids"]


def test_chat_template_environment(tok):
    """The transformers extras: raise_exception, loop controls, tojson without HTML escaping, None keys dropped."""
    with pytest.raises(Exception, match="not tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    tok2 = HFTokenizer(tok._tok, tok.config, chat_template=(
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m | tojson }}|{{ m.name is defined }}{% endfor %}{{ bos_token }}{{ extra }}"))
    msgs = [{"role": "user", "content": "<b>é</b>", "name": None}] * 3
    assert tok2.apply_chat_template(msgs, extra="!") == (
        '{"role": "user", "content": "<b>é</b>"}|False' * 2 + tok.special_tokens["bos_token"] + "!")


def test_missing_files_and_template(tmp_path, tok):
    with pytest.raises(DataError, match=r"tokenizer\.json is missing"):
        HFTokenizer.from_dir(tmp_path)
    shutil.copy(os.path.join(TOK_DIR, "tokenizer.json"), tmp_path)
    with pytest.raises(DataError, match=r"tokenizer_config\.json is missing"):
        HFTokenizer.from_dir(tmp_path)
    config = {k: v for k, v in tok.config.items() if k != "chat_template"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    no_template = HFTokenizer.from_dir(tmp_path)
    assert no_template.encode("Hello world!", add_special_tokens=True) == REF["prompts"][0]["input_ids"]
    with pytest.raises(DataError, match="no chat_template"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(DataError, match="empty conversation"):
        tok.apply_chat_template([])
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert HFTokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def _stream(tokenizer, ids, chunks):
    dec = StreamDecoder(tokenizer)
    pieces, i = [], 0
    for n in chunks:
        pieces.append(dec.push(ids[i:i + n]))
        i += n
    pieces.append(dec.push(ids[i:]))
    pieces.append(dec.flush())
    return pieces


@pytest.mark.parametrize("which", ["hf", "sentencepiece"])
@pytest.mark.parametrize("text", STREAM_TEXTS, ids=range(len(STREAM_TEXTS)))
def test_stream_decoder(request, which, text):
    tokenizer = request.getfixturevalue("tok" if which == "hf" else "spm_tok")
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    assert full == text
    # the non-ASCII texts do split characters over tokens, so the hold-back is exercised
    assert text.isascii() or any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    rng = random.Random(0)
    for chunks in [[1] * len(ids)] + [[rng.randint(1, 5) for _ in range(len(ids))] for _ in range(4)]:
        pieces = _stream(tokenizer, ids, chunks)
        assert "".join(pieces) == full
        assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_incomplete_tail(tok):
    ids = tok.encode("ab🎉")
    dec = StreamDecoder(tok)
    assert dec.push(ids[:-1]) == "ab"
    assert dec.flush().endswith("\ufffd")  # an unfinished character is flushed as U+FFFD
    assert dec.push(ids) == "ab🎉"  # flush starts over
    dec = StreamDecoder(tok, skip_special_tokens=True)
    assert dec.push([tok.bos_id, *ids, tok.eos_id]) + dec.flush() == "ab🎉"


def test_stream_decoder_window_stays_short(tok):
    """One id at a time over a long text: every decode call sees only a few ids (work is O(new ids))."""
    ids = tok.encode(STREAM_TEXTS[0] * 20)
    lengths = []

    class Counting:
        def decode(self, window):
            lengths.append(len(window))
            return tok.decode(window)

    dec = StreamDecoder(Counting())
    assert "".join(dec.push([i]) for i in ids) + dec.flush() == tok.decode(ids)
    assert max(lengths) <= 8
