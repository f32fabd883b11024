"""The tokenizer of a HuggingFace DeepSeek release (tokenizer.json + tokenizer_config.json), its chat template, and
incremental detokenization for streaming.

Follows transformers 5.x: `encode(text, add_special_tokens=True)` gives `AutoTokenizer.from_pretrained(dir)(text)
["input_ids"]`. In 5.x the post-processor stored in tokenizer.json decides which special tokens are added (a BOS for
DeepSeek); `add_bos_token` / `add_eos_token` in tokenizer_config.json are ignored once a tokenizer.json exists.
`apply_chat_template` renders like `apply_chat_template(messages, tokenize=False)`; its ids are
`encode(text, add_special_tokens=False)`, as transformers tokenizes chats.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import numpy as np
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

from deepseek_jax.data.errors import DataError

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES), when set.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # templates read the first; the others are aliases


def _token_text(value: Any) -> str | None:
    """A special-token field of tokenizer_config.json: a string, an AddedToken dict {"content": ...}, or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A HF `tokenizers` model plus its tokenizer_config.json; the same surface as the SentencePiece `Tokenizer`."""

    def __init__(self, backend: _Backend, config: Mapping[str, Any], path: str | None = None,
                 chat_template: str | None = None):
        self._tok = backend
        self.config = dict(config)
        self.path = path
        self.special_tokens = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        absent = [t for t in self.special_tokens.values() if backend.token_to_id(t) is None]
        if absent:  # transformers adds configured special tokens the vocabulary lacks
            backend.add_special_tokens(list(dict.fromkeys(absent)))
        template = chat_template if chat_template is not None else config.get("chat_template")
        if isinstance(template, list):  # the named-templates form [{"name": ..., "template": ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        self.chat_template: str | None = template or None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
        """Load tokenizer.json and tokenizer_config.json (and chat_template.jinja, which wins if present)."""
        path = os.fspath(path)
        model_file, config_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
        for file in (model_file, config_file):
            if not os.path.isfile(file):
                raise DataError(f"{file} is missing: a HF tokenizer directory needs tokenizer.json and "
                                "tokenizer_config.json; copy both from the model's release")
        try:
            backend = _Backend.from_file(model_file)
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except Exception as e:  # the Rust side raises plain Exception; bad JSON raises ValueError
            raise DataError(f"cannot read the tokenizer in {path} ({e}); restore the release's original files") from e
        jinja_file = os.path.join(path, "chat_template.jinja")
        template = pathlib.Path(jinja_file).read_text(encoding="utf-8") if os.path.isfile(jinja_file) else None
        return cls(backend, config, path, template)

    def _special_id(self, key: str, default: int = -1) -> int:
        """The id of a configured special token, else `default` (-1 for none, as SentencePiece reports it)."""
        token_id = self._tok.token_to_id(self.special_tokens[key]) if key in self.special_tokens else None
        return default if token_id is None else token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding needs at least this many rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int:
        """pad_token's id, else eos (DeepSeek pads with eos), else 0."""
        return self._special_id("pad_token", self.eos_id if self.eos_id >= 0 else 0)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; with add_special_tokens, plus what tokenizer.json's post-processor adds (transformers' default).

        The default (False) matches the SentencePiece `Tokenizer`, which adds nothing."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The chat as a prompt string, rendered like transformers' apply_chat_template(..., tokenize=False).

        `kwargs` become template variables (e.g. `tools` as JSON schemas); they override the special tokens."""
        if not self.chat_template:
            raise DataError(f"{os.path.join(self.path or '(in memory)', 'tokenizer_config.json')} has no "
                            "chat_template; add the model's template there (or a chat_template.jinja file), or encode "
                            "a plain prompt with encode() instead")
        if not messages:
            raise DataError("cannot apply a chat template to an empty conversation; give at least one message")
        chat = []
        for message in messages:  # as transformers: drop None values, alias the reasoning field
            m = _plain({k: v for k, v in message.items() if v is not None})
            reasoning = next((m[k] for k in _REASONING_KEYS if k in m), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(m)
        variables = {"tools": None, "documents": None, **self.special_tokens, **_plain(kwargs)}
        return _compile(self.chat_template).render(**variables, messages=chat,
                                                   add_generation_prompt=add_generation_prompt)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only (subclasses reduced to their base), so the sandboxed template sees no
    foreign objects; anything else becomes an inert "<TypeName>" placeholder, as in transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    return f"<{type(value).__name__}>"


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' masks; here it just renders."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> list:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() refusing underscore-prefixed attributes (no reach into Python internals)."""

    def __init__(*args: Any, **kwargs: Any):
        for name in dict(*args[1:], **kwargs):
            _public(name)
        jinja2.utils.Namespace.__init__(*args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        jinja2.utils.Namespace.__setitem__(self, _public(name), value)


def _public(name: Any) -> Any:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template may not set namespace attribute {name!r}")
    return name


class _DictBuilder:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """json.dumps without jinja's HTML escaping (transformers' tojson)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The environment transformers renders chat templates in: sandboxed, immutable, trim_blocks + lstrip_blocks."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_DictBuilder(), namespace=_Namespace)
    return env.from_string(template)


def encode_prompt(tokenizer: Any, prompt: str | Sequence[Mapping[str, Any]]) -> list[int]:
    """A prompt's ids as launch.generate and the server feed them. A chat (a list of messages) is its rendered
    template with a generation prompt, encoded without extra special tokens (as HF does); a plain string gets what
    an HF tokenizer's post-processor adds (DeepSeek: BOS), and nothing from a run's SentencePiece tokenizer, as in
    training."""
    if not isinstance(prompt, str):
        if not isinstance(tokenizer, HFTokenizer):
            raise DataError("a chat needs a chat_template, which only HF checkpoints (--hf_dir) carry; send a plain "
                            "prompt instead")
        return tokenizer.encode(tokenizer.apply_chat_template(prompt))
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode(prompt, add_special_tokens=True)
    return tokenizer.encode(prompt)


class StreamDecoder:
    """Text for token ids as they arrive: the pieces `push` returns concatenate to `decode(all ids)`.

    A multi-byte character split over byte-level (or byte-fallback) tokens decodes to a trailing U+FFFD until its
    last byte arrives; that tail is held back. Only a window of recent ids is re-decoded: it starts at the
    previous character boundary, with the chunk before it as context. Works with any tokenizer whose
    `decode(ids, **decode_kwargs)` returns text (HFTokenizer, the SentencePiece Tokenizer)."""

    def __init__(self, tokenizer: Any, **decode_kwargs: Any):
        self._decode = functools.partial(tokenizer.decode, **decode_kwargs)
        self._ids: list[int] = []  # the window: context ids, then ids not yet fully emitted
        self._context = 0  # leading ids of the window whose text is all emitted
        self._sent = 0  # characters of decode(self._ids) already returned

    def _take(self, final: bool) -> str:
        if len(self._ids) == self._context:
            return ""
        text = self._decode(self._ids)
        if not final and text.endswith("\ufffd"):  # an incomplete character: wait for its remaining bytes
            done = text.rstrip("\ufffd")
            out, self._sent = done[self._sent:], max(self._sent, len(done))
            return out
        out = text[self._sent:]
        del self._ids[:self._context]  # the window now starts at the previous boundary
        self._context = len(self._ids)
        self._sent = len(self._decode(self._ids))
        return out

    def push(self, new_ids: Iterable[int]) -> str:
        """Add ids; returns the text they complete (possibly "")."""
        self._ids.extend(int(i) for i in new_ids)
        return self._take(final=False)

    def flush(self) -> str:
        """Whatever is still held (an incomplete character decodes as U+FFFD); the decoder then starts over."""
        text = self._take(final=True)
        self._ids, self._context, self._sent = [], 0, 0
        return text
