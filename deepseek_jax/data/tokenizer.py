"""SentencePiece tokenizer: load a given `.model`, or train a BPE model once and cache it.

Trained models have fixed special ids pad=0, unk=1, bos=2, eos=3 and byte fallback, so any
UTF-8 text encodes and `decode(encode(s)) == s` (identity normalization, no dummy prefix). R1's
<think>, </think>, <answer>, </answer> tags are single pieces, so a stop string is one token.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sentencepiece as spm

from deepseek_jax.data.corpus import default_documents
from deepseek_jax.data.errors import DataError

MAX_TRAIN_CHARS = 20_000_000  # tokenizer training reads at most this much text (the first lines)
TRAINER_OPTIONS = dict(
    model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3, byte_fallback=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
    allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
    max_sentence_length=1 << 16, shuffle_input_sentence=False, num_threads=4,
    user_defined_symbols=["<think>", "</think>", "<answer>", "</answer>"],  # R1's tags: one token wherever they are
)


class Tokenizer:
    """A SentencePiece model. `encode` adds no bos/eos; the pipeline appends `eos_id` to each document."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._proto = model_proto
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self._sp.eos_id() < 0:
            raise DataError(f"tokenizer {path or '(in memory)'} has no eos piece; the pipeline needs one to end "
                            "documents. Train it with eos_id set, or leave data.tokenizer empty to train one")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """The model's pad id, or 0 if it has none (padding is masked by segment id 0 anyway)."""
        return max(self._sp.pad_id(), 0)

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, path: str) -> None:
        """Write the model file (atomically), e.g. into a run's workdir."""
        _atomic_write(path, self._proto)

    def __reduce__(self):
        return Tokenizer, (self._proto, self.path)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def default_cache_dir() -> str:
    """$DEEPSEEK_JAX_CACHE, else ~/.cache/deepseek_jax."""
    return os.environ.get("DEEPSEEK_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deepseek_jax")


def load_tokenizer(model_path: str, vocab_size: int | None = None) -> Tokenizer:
    """A Tokenizer from a `.model` file; with `vocab_size`, its size must match."""
    try:
        with open(model_path, "rb") as f:
            proto = f.read()
    except OSError as e:
        raise DataError(f"tokenizer model {model_path} cannot be read ({e.strerror}); fix data.tokenizer, "
                        "or leave it empty to train one on the default corpus") from e
    try:
        tok = Tokenizer(proto, os.path.abspath(model_path))
    except RuntimeError as e:
        raise DataError(f"tokenizer model {model_path} is not a valid SentencePiece model ({e}); "
                        "point data.tokenizer at a sentencepiece .model file") from e
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise DataError(f"tokenizer {model_path} has {tok.vocab_size} pieces but model.vocab_size={vocab_size}; "
                        f"set model.vocab_size={tok.vocab_size}")
    return tok


def run_tokenizer(workdir: str) -> Any:
    """The tokenizer of a launch.train run: the HF tokenizer.json it copied (runs started from a HF checkpoint),
    the tokenizer.model it saved, else (runs from before they did) its data.tokenizer, else the same one trained
    again on the default corpus."""
    if os.path.exists(os.path.join(workdir, "tokenizer.json")):
        from deepseek_jax.data.hf_tokenizer import HFTokenizer

        return HFTokenizer.from_dir(workdir)
    path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(path):
        return load_tokenizer(path)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    return load_or_train_tokenizer(config["data"].get("tokenizer") or None, config["model"]["vocab_size"])


def load_or_train_tokenizer(model_path: str | None, vocab_size: int,
                            documents_fn: Callable[[], Iterable[str]] | None = None,
                            cache_dir: str | None = None) -> Tokenizer:
    """The tokenizer at `model_path`, else a BPE model of `vocab_size` pieces trained on `documents_fn()`
    (default: the embedded corpus), cached under `cache_dir` by a hash of (text, vocab size, options)."""
    if model_path:
        return load_tokenizer(model_path, vocab_size)
    lines = _training_lines(documents_fn() if documents_fn else default_documents())
    if not lines:
        raise DataError("no text to train a tokenizer on; give documents or a data.tokenizer model")
    options = TRAINER_OPTIONS | {"vocab_size": vocab_size}
    digest = hashlib.sha256(json.dumps([spm.__version__, options], sort_keys=True).encode())
    for line in lines:
        digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
    path = os.path.join(cache_dir or default_cache_dir(), "tokenizers",
                        f"spm_{options['model_type']}_{vocab_size}_{digest.hexdigest()[:16]}.model")
    if os.path.exists(path):
        try:
            return load_tokenizer(path, vocab_size)
        except DataError:
            pass  # a damaged cache entry: train again and replace it
    proto = _train(lines, options)
    try:
        _atomic_write(path, proto)
    except OSError as e:
        warnings.warn(f"cannot cache the tokenizer at {path} ({e.strerror}); using it from memory. "
                      "Set $DEEPSEEK_JAX_CACHE to a writable directory to keep it", stacklevel=2)
        return Tokenizer(proto, None)
    return Tokenizer(proto, path)


def _training_lines(documents: Iterable[str]) -> list[str]:
    """Non-blank lines of the documents (each line is one SentencePiece sentence), up to MAX_TRAIN_CHARS."""
    lines, total = [], 0
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                lines.append(line)
                total += len(line)
        if total >= MAX_TRAIN_CHARS:
            break
    return lines


def _train(lines: list[str], options: dict) -> bytes:
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, minloglevel=2, **options)
    except RuntimeError as e:
        most, least = re.search(r"<= (\d+)", str(e)), re.search(r"required_chars. \d+ vs (\d+)", str(e))
        if most:
            hint = (f"this text supports at most {most.group(1)} pieces; set model.vocab_size <= {most.group(1)} "
                    "or train on more text")
        elif least:
            hint = f"this text needs more than {least.group(1)} pieces; set a larger model.vocab_size"
        else:
            hint = "try another model.vocab_size"
        raise DataError(f"cannot train a {options['vocab_size']}-piece tokenizer on {len(lines)} lines of text: "
                        f"{hint}, or pass a data.tokenizer model ({e})") from e
    return buf.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
    """Write via a temp file + rename so concurrent readers never see a partial file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".model")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
