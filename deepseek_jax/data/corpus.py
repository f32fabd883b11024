"""The embedded default corpus: Python's own reference docs, shipped with every CPython install.

`pydoc_data.topics` (what `help("topics")` prints) is ~0.5 MB of English prose and code examples,
so `source="default"` trains on any machine without a download or network access.
"""

from __future__ import annotations

import functools
import re

from deepseek_jax.data.errors import DataError

MIN_DOC_CHARS = 2000  # paragraphs are grouped into documents of at least this many characters
_BLANK_LINES = re.compile(r"\n\s*\n")


def paragraph_groups(text: str, min_chars: int = MIN_DOC_CHARS) -> list[str]:
    """Cut `text` at blank lines and join consecutive paragraphs (with one blank line) into
    documents of >= `min_chars` characters; the last one may be shorter. Whitespace-only
    paragraphs are dropped; indentation is kept."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in _BLANK_LINES.split(text):
        para = para.rstrip()
        if not para.strip():
            continue
        current.append(para)
        size += len(para) + 2
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


@functools.cache
def _documents() -> tuple[str, ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split the stdlib docs into a separate package
        raise DataError("this Python has no pydoc_data module, so the default corpus is unavailable; "
                        "set data.source to your own .txt/.jsonl/.array_record files") from e
    return tuple(doc for key in sorted(topics) for doc in paragraph_groups(topics[key]))


def default_documents() -> list[str]:
    """The default corpus as documents (one topic is cut into ~2k-character paragraph groups), in a fixed order."""
    return list(_documents())
