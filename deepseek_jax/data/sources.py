"""Document sources: the default corpus, `.txt`, `.jsonl` and `.array_record` files.

A source string is "default", "synthetic:MIX[:N]" (generated arithmetic text, MIX a key of synthetic.CORPORA), or a
comma list of files, directories (searched recursively for supported files) and globs. Documents are numbered in
that order (files sorted within a glob or directory), which fixes the eval hold-out and the shuffle.

- `.txt`: cut at blank lines into paragraphs; consecutive paragraphs are joined into documents
  of >= 2,000 characters (`corpus.paragraph_groups`). A line that is not UTF-8 is dropped.
- `.jsonl`: one document per line, its "text" field. A bad line (not UTF-8, not JSON, no "text")
  is skipped.
- `.array_record`: one document per record, UTF-8 text or a JSON object with a "text" field.
  Records are read lazily (random access), so bad records are found and counted while iterating.

Empty files are skipped with a warning; every skip is counted in `DataStats`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import glob
import json
import os
import threading
import warnings
from collections.abc import Iterator

import grain

from deepseek_jax.data.corpus import default_documents, paragraph_groups
from deepseek_jax.data.errors import DataError
from deepseek_jax.data.synthetic import CORPORA, arithmetic_corpus

TEXT, JSONL, ARRAY_RECORD = ".txt", ".jsonl", ".array_record"
SUPPORTED = (TEXT, JSONL, ARRAY_RECORD)
_MAX_WARNINGS = 10  # per array_record file; later bad records are only counted


@dataclasses.dataclass
class DataStats:
    """Counters a trainer can log. `docs_read` counts documents tokenized so far (prefetch included)."""

    files: int = 0
    empty_files_skipped: int = 0
    docs_in_source: int = 0
    docs_in_split: int = 0
    docs_read: int = 0
    bad_utf8_skipped: int = 0
    bad_json_skipped: int = 0
    empty_docs_skipped: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, n in counts.items():
                setattr(self, key, getattr(self, key) + n)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """An eagerly read file: its documents, skip counts and the warnings to show."""

    docs: tuple[str, ...]
    counts: dict[str, int]
    problems: tuple[str, ...]


def _lines_note(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:10]))
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{', ...' if len(numbers) > 10 else ''}"


def _text_field(obj: object) -> tuple[str | None, str | None]:
    """(text, None) for a JSON object with a string "text" field, else (None, the counter to bump)."""
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return None, "bad_json_skipped"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud8xx escapes
        return None, "bad_utf8_skipped"
    return text, None


def _parse_json(line: str) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


@functools.lru_cache(maxsize=16)
def _load_file(path: str, size: int, mtime_ns: int) -> _Loaded:
    """Read one .txt or .jsonl file (cached by path, size and mtime: eval iterators are rebuilt often)."""
    del size, mtime_ns  # cache key only
    with open(path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    bad: dict[str, list[int]] = {"bad_utf8_skipped": [], "bad_json_skipped": []}
    texts, empty_docs = [], 0
    for number, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad["bad_utf8_skipped"].append(number)
            continue
        if path.endswith(TEXT):
            texts.append(line)
        elif line.strip():
            text, problem = _text_field(_parse_json(line))
            if problem:
                bad[problem].append(number)
            elif text.strip():
                texts.append(text)
            else:
                empty_docs += 1
    if path.endswith(TEXT):
        docs = tuple(paragraph_groups("\n".join(texts).lstrip("\ufeff")))
    else:
        docs = tuple(texts)
    empty = not docs and not any(bad.values()) and not empty_docs
    counts = {k: len(v) for k, v in bad.items()} | {"empty_docs_skipped": empty_docs, "empty_files_skipped": int(empty)}
    problems = [f"skipped empty file {path}"] if empty else []
    what = {"bad_utf8_skipped": "not valid UTF-8", "bad_json_skipped": 'not a JSON object with a string "text"'}
    problems += [f"skipped {len(v)} line(s) of {path} that are {what[k]}: {_lines_note(v)}"
                 for k, v in bad.items() if v]
    return _Loaded(docs, counts, tuple(problems))


class _ArrayRecordFile:
    """Random access to the records of one .array_record file; a bad record reads as None."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.source = grain.sources.ArrayRecordDataSource([path])
            self.length = len(self.source)
        except Exception as e:
            raise DataError(f"{path} is not a readable ArrayRecord file ({e}); check the file or remove it "
                            "from data.source") from e
        self._bad: set[int] = set()
        self._lock = threading.Lock()

    def get(self, index: int, stats: DataStats | None) -> str | None:
        record = self.source[index]
        text, problem = None, None
        try:
            text = record.decode("utf-8")
        except UnicodeDecodeError:
            problem = "bad_utf8_skipped"
        if text is not None and text.lstrip().startswith("{"):
            obj = _parse_json(text)
            if isinstance(obj, dict):  # else: plain text that happens to start with "{"
                text, problem = _text_field(obj)
        if problem is None and not text.strip():
            problem, text = "empty_docs_skipped", None
        if problem and stats is not None and index not in self._bad:
            with self._lock:
                first = index not in self._bad
                self._bad.add(index)
            if first:  # count each bad record once, not once per epoch
                stats.add(**{problem: 1})
                if problem != "empty_docs_skipped" and len(self._bad) <= _MAX_WARNINGS:
                    more = "; further bad records are only counted" if len(self._bad) == _MAX_WARNINGS else ""
                    warnings.warn(f"skipped record {index} of {self.path}: {problem.removesuffix('_skipped')}{more}",
                                  stacklevel=2)
        return text


class DocumentStore:
    """All documents of a source, by global index. `get` returns None for a bad record (skip it)."""

    def __init__(self, parts: list[tuple[str, ...] | _ArrayRecordFile], name: str):
        self.parts, self.name = parts, name
        self._starts, total = [], 0
        for part in parts:
            self._starts.append(total)
            total += part.length if isinstance(part, _ArrayRecordFile) else len(part)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def get(self, index: int, stats: DataStats | None = None) -> str | None:
        k = bisect.bisect_right(self._starts, index) - 1
        part, offset = self.parts[k], index - self._starts[k]
        return part.get(offset, stats) if isinstance(part, _ArrayRecordFile) else part[offset]


def resolve_files(source: str) -> list[str]:
    """The files a comma list of paths, directories and globs names, in order, without repeats."""
    files: list[str] = []
    for item in (s.strip() for s in source.split(",")):
        if not item:
            continue
        path = os.path.expanduser(item)
        if glob.has_magic(path):
            found = _supported(p for m in sorted(glob.glob(path, recursive=True)) for p in _walk(m))
            if not found:
                raise DataError(f"data source glob {item!r} matches no {'/'.join(SUPPORTED)} files; fix the pattern")
        elif os.path.isdir(path):
            found = _supported(_walk(path))
            if not found:
                raise DataError(f"data source directory {item!r} holds no {'/'.join(SUPPORTED)} files")
        elif os.path.isfile(path):
            if not path.endswith(SUPPORTED):
                raise DataError(f"data source file {item!r} is not one of {'/'.join(SUPPORTED)}; rename or convert it")
            found = [path]
        else:
            raise DataError(f"data source {item!r} does not exist; give a file, directory, glob or 'default'")
        files += [f for f in found if f not in files]
    if not files:
        raise DataError(f"data source {source!r} names no files; give a file, directory, glob or 'default'")
    return files


def _walk(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    return sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)


def _supported(paths: Iterator[str]) -> list[str]:
    return [p for p in paths if p.endswith(SUPPORTED) and os.path.isfile(p)]


def synthetic_documents(source: str) -> tuple[str, ...]:
    """"synthetic:MIX[:N]": N (default 2000) generated arithmetic documents (synthetic.arithmetic_corpus), MIX one
    of synthetic.CORPORA ("arithmetic": the full mix; "combine", "explore", "explore10": the R1-Zero bases)."""
    _, name, *rest = source.split(":")
    if name not in CORPORA or len(rest) > 1 or (rest and not (rest[0].isascii() and rest[0].isdigit())):
        raise DataError(f"data source {source!r}: a synthetic corpus is synthetic:MIX[:N documents], MIX one of "
                        f"{', '.join(CORPORA)}")
    return tuple(arithmetic_corpus(0, int(rest[0]) if rest else 2000, name))


def open_source(source: str, stats: DataStats) -> DocumentStore:
    """The documents of `source` ("default", "synthetic:...", or files); warns about and counts skipped data."""
    if source == "default" or source.startswith("synthetic:"):
        docs = tuple(default_documents()) if source == "default" else synthetic_documents(source)
        stats.add(docs_in_source=len(docs))
        return DocumentStore([docs], "the default corpus" if source == "default" else source)
    parts: list[tuple[str, ...] | _ArrayRecordFile] = []
    files = resolve_files(source)
    for path in files:
        stats.add(files=1)
        if path.endswith(ARRAY_RECORD):
            part = _ArrayRecordFile(path)
            if part.length == 0:
                warnings.warn(f"skipped empty file {path}", stacklevel=3)
                stats.add(empty_files_skipped=1)
                continue
            parts.append(part)
        else:
            st = os.stat(path)
            loaded = _load_file(os.path.abspath(path), st.st_size, st.st_mtime_ns)
            for problem in loaded.problems:
                warnings.warn(problem, stacklevel=3)
            stats.add(**loaded.counts)
            if loaded.docs:
                parts.append(loaded.docs)
    store = DocumentStore(parts, f"data source {source!r}")
    stats.add(docs_in_source=len(store))
    if not len(store):
        if stats.empty_files_skipped == len(files):
            raise DataError(f"every file of data source {source!r} is empty ({len(files)} files); "
                            "point data.source at files with text")
        raise DataError(f"data source {source!r} has no usable documents ({stats.as_dict()}); see the warnings above")
    return store


def source_documents(source: str) -> Iterator[str]:
    """Every good document of `source`, in order (e.g. to train a tokenizer on your own data)."""
    store = open_source(source, DataStats())
    for i in range(len(store)):
        text = store.get(i)
        if text is not None:
            yield text
