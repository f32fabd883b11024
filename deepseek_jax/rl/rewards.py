"""Rule-based rewards for DeepSeek-R1-style RL (GRPO): no reward model, only checks a program can verify.

Every reward is a small pure function `reward(text, **args) -> float` over the model's response text, looked up
by name in `REWARDS` (adding a reward is one function plus one line there). All of them

* never raise on any string (megabytes of text, NUL bytes, lone surrogates, unicode digits, code injection
  attempts); a malformed answer simply scores 0.0. The one exception is `language_consistency` with a language it
  does not know, which is a programming error, not a model output, and raises ValueError;
* run in linear time with C-level string scans (`str.find`/`str.rfind`/`str.count`, no backtracking regex),
  so they take milliseconds even on megabyte inputs;
* never evaluate the model's text as code: countdown expressions go through the small tokenizer and
  recursive-descent parser below (`+ - * /`, parentheses, integers), evaluated with exact `Fraction` arithmetic.

Answer extraction: the answer is the content of the LAST `<answer>...</answer>` block (the last `</answer>` and
the last `<answer>` before it), so a model that restates or corrects itself is judged on its final answer.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Callable
from fractions import Fraction

from deepseek_jax.data.sft import THINK_OPEN

THINK_CLOSE = "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Bounds on a countdown answer, all checked before any arithmetic is done.
MAX_ANSWER_CHARS = 512  # the <answer> content, before whitespace is stripped
MAX_TOKENS = 64  # integers, operators and parentheses
MAX_DEPTH = 32  # parenthesis nesting
MAX_LITERAL_DIGITS = 6  # an integer literal has at most this many digits
MAX_MAGNITUDE = 10**18  # every intermediate numerator and denominator, checked after each operation
MAX_INT_ANSWER_DIGITS = 20  # arithmetic_accuracy: at most this many digits

_DIGITS = frozenset("0123456789")  # ASCII only: str.isdigit() would also accept '²', '٣', '１'
_SPACES = frozenset(" \t\n\r\f\v")  # ASCII whitespace allowed between tokens
_BINARY_OPS = frozenset("+-*/")


def _last_answer_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last <answer>...</answer> block, without copying the text."""
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return start + len(ANSWER_OPEN), end


def last_answer(text: str) -> str | None:
    """The content of the last `<answer>...</answer>` block of `text` (unstripped), or None if there is none."""
    if not isinstance(text, str):
        return None
    span = _last_answer_span(text)
    return None if span is None else text[span[0]:span[1]]


# ---------------------------------------------------------------------------------------------------------------
# Countdown expressions: tokenizer + recursive-descent parser, exact arithmetic, everything bounded.
#
#   expr   := term (('+' | '-') term)*
#   term   := factor (('*' | '/') factor)*
#   factor := INTEGER | '(' expr ')'
#
# No unary minus or plus ("-3", "+3", "2*-3" are malformed), no exponent, no decimal point, no scientific
# notation. INTEGER is 1-6 ASCII digits without a leading zero ("0" itself is fine, "07" is not), so that each
# literal is written exactly one way and matches the given numbers unambiguously. Tokens may be separated by ASCII
# whitespace (space, tab, newline, CR, FF, VT) only; a no-break space or any other character is malformed.
# ---------------------------------------------------------------------------------------------------------------


def tokenize_expression(expr: str) -> list[int | str] | None:
    """Integers (as int) and the operator/parenthesis characters (as str), or None if `expr` is malformed
    or breaks a bound (length, token count, nesting depth, literal length)."""
    if not isinstance(expr, str) or len(expr) > MAX_ANSWER_CHARS:
        return None
    tokens: list[int | str] = []
    depth = 0
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in _SPACES:
            i += 1
            continue
        if c in _DIGITS:
            j = i + 1
            while j < n and expr[j] in _DIGITS:
                j += 1
            if j - i > MAX_LITERAL_DIGITS or (c == "0" and j - i > 1):
                return None
            tokens.append(int(expr[i:j]))
            i = j
        elif c in _BINARY_OPS:
            tokens.append(c)
            i += 1
        elif c == "(":
            depth += 1
            if depth > MAX_DEPTH:
                return None
            tokens.append(c)
            i += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return None
            tokens.append(c)
            i += 1
        else:
            return None
        if len(tokens) > MAX_TOKENS:
            return None
    if depth != 0 or not tokens:
        return None
    return tokens


def apply_op(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    """a op b exactly; None for a division by zero or a result beyond MAX_MAGNITUDE."""
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    else:
        if b == 0:
            return None
        r = a / b
    if abs(r.numerator) > MAX_MAGNITUDE or r.denominator > MAX_MAGNITUDE:
        return None
    return r


class _Parser:
    """Recursive descent over a bounded token list. Recursion depth is at most ~3 frames per parenthesis level,
    and the tokenizer already capped nesting at MAX_DEPTH."""

    def __init__(self, tokens: list[int | str]):
        self.tokens = tokens
        self.pos = 0

    def _peek(self) -> int | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> Fraction | None:
        value = self._expr()
        if value is None or self.pos != len(self.tokens):
            return None
        return value

    def _binary(self, operand: Callable[[], Fraction | None], ops: tuple[str, str]) -> Fraction | None:
        left = operand()
        while left is not None:
            op = self._peek()
            if not isinstance(op, str) or op not in ops:
                break
            self.pos += 1
            right = operand()
            if right is None:
                return None
            left = apply_op(op, left, right)
        return left

    def _expr(self) -> Fraction | None:
        return self._binary(self._term, ("+", "-"))

    def _term(self) -> Fraction | None:
        return self._binary(self._factor, ("*", "/"))

    def _factor(self) -> Fraction | None:
        tok = self._peek()
        if isinstance(tok, int):
            self.pos += 1
            return Fraction(tok)
        if tok == "(":
            self.pos += 1
            value = self._expr()
            if value is None or self._peek() != ")":
                return None
            self.pos += 1
            return value
        return None


def evaluate_tokens(tokens: list[int | str]) -> Fraction | None:
    """The exact value of a token list from `tokenize_expression`, or None (syntax error, division by zero,
    an intermediate beyond MAX_MAGNITUDE)."""
    return _Parser(tokens).parse()


def evaluate_expression(expr: str) -> Fraction | None:
    """The exact value of an arithmetic expression string under the countdown grammar, or None if it is
    malformed or out of bounds. Never evaluates anything as Python."""
    try:
        tokens = tokenize_expression(expr)
        return None if tokens is None else evaluate_tokens(tokens)
    except Exception:  # defensive: the code above has no known way to raise
        return None


def _strip_target_suffix(answer: str, target: int) -> str | None:
    """Drop a trailing "= <target>" (the target written as a plain integer, ASCII whitespace around it allowed).
    Returns the expression part, or None if there is an '=' that is not exactly that."""
    eq = answer.find("=")
    if eq < 0:
        return answer
    rhs = answer[eq + 1:].strip(" \t\n\r\f\v")
    try:
        written = str(operator.index(target))  # ints, numpy ints; not floats or strings
    except TypeError:
        return None
    if rhs != written:
        return None
    return answer[:eq]


def _countdown_ok(text: str, numbers, target) -> bool:
    if not isinstance(text, str):
        return False
    span = _last_answer_span(text)
    if span is None or span[1] - span[0] > MAX_ANSWER_CHARS:
        return False
    expr = _strip_target_suffix(text[span[0]:span[1]], target)
    if expr is None:
        return False
    tokens = tokenize_expression(expr)
    if tokens is None:
        return False
    literals = [t for t in tokens if isinstance(t, int)]
    if Counter(literals) != Counter(numbers):  # each given number used exactly once, nothing else
        return False
    value = evaluate_tokens(tokens)
    return value is not None and value == target


def countdown_accuracy(text: str, numbers, target: int) -> float:
    """1.0 iff the last <answer> block is an expression over exactly the given `numbers` (as a multiset: each
    used exactly once, no other literals) with binary + - * / and parentheses whose exact value is `target`.

    Intermediate results may be fractions (e.g. (7 / 2) * 2 is 7 exactly) or negative; division by zero is wrong.
    Unary signs ("-3", "7 - -3") and literals with a leading zero ("07") are malformed.
    A trailing "= <target>" is tolerated and ignored, but only when the right-hand side is exactly the target
    written as a plain integer ("(3 + 5) * 2 = 16" for target 16); any other '=' makes the answer wrong, and the
    right-hand side never counts as a used number. Malformed or out-of-bounds answers score 0.0 (see the bounds
    at the top of this module); this function never raises.
    """
    try:
        return 1.0 if _countdown_ok(text, numbers, target) else 0.0
    except Exception:  # defensive, e.g. `numbers` not iterable: a bad argument is never a crash in the RL loop
        return 0.0


def format_reward(text: str) -> float:
    """1.0 iff `text` is exactly: optional whitespace, `<think>...</think>`, optional whitespace,
    `<answer>...</answer>`, optional whitespace -- with each of the four tags occurring exactly once.
    The contents may be empty. Linear time: four counts and two finds."""
    if not isinstance(text, str):
        return 0.0
    for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE):
        if text.count(tag) != 1:
            return 0.0
    body = text.lstrip()
    if not body.startswith(THINK_OPEN):
        return 0.0
    close = body.find(THINK_CLOSE)  # exists (counted above) and, since <think> opens the body, comes after it
    rest = body[close + len(THINK_CLOSE):].lstrip()
    if not rest.startswith(ANSWER_OPEN):
        return 0.0
    end = rest.find(ANSWER_CLOSE)
    if end < 0:  # the only </answer> was inside the think block
        return 0.0
    return 0.0 if rest[end + len(ANSWER_CLOSE):].strip() else 1.0


# ---------------------------------------------------------------------------------------------------------------
# Language consistency (DeepSeek-R1, section 2.3.3): the share of the chain of thought's words in the target
# language.
#
# Words: maximal runs of unicode letters/digits (str.isalnum, no underscore), except that every CJK ideograph is a
# word of its own (Chinese has no spaces; "我们" is two words). The same segmentation is used for every language,
# so the scores of different languages are comparable. "en" counts words made only of ASCII letters/digits;
# "zh" counts CJK ideographs, so digits in a Chinese chain of thought count against it.
# ---------------------------------------------------------------------------------------------------------------

_CJK = ("\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
        "\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f\U00030000-\U0003134f")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_WORD = re.compile(f"[^\\W_{_CJK}]+|[{_CJK}]")  # a non-CJK word, or one ideograph
_ASCII_WORD = re.compile(f"(?<![^\\W_{_CJK}])[A-Za-z0-9]+(?![^\\W_{_CJK}])")  # a whole non-CJK word, all ASCII
_ASCII_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

# Past LANG_MAX_CHARS, the score is estimated on LANG_WINDOWS evenly spaced windows that cover LANG_MAX_CHARS
# characters in all (first and last included), so even a megabyte chain of thought costs a few milliseconds; a
# switch of language late in a long chain of thought still shows. Non-ASCII text is never cheaper than that:
# Python's regex engine needs ~60 ns per character for the unicode classes.
LANG_MAX_CHARS = 32_768
LANG_WINDOWS = 16


def _count(pattern: re.Pattern, text: str) -> int:
    return pattern.subn("", text)[1]  # counts in C, without a Python object per match


def _language_sample(content: str) -> list[str]:
    if len(content) <= LANG_MAX_CHARS:
        return [content]
    width = LANG_MAX_CHARS // LANG_WINDOWS
    stride = (len(content) - width) / (LANG_WINDOWS - 1)
    return [content[round(k * stride):round(k * stride) + width] for k in range(LANG_WINDOWS)]


def _think_content(text: str) -> str:
    start = text.find(THINK_OPEN)
    if start < 0:
        return text
    start += len(THINK_OPEN)
    end = text.find(THINK_CLOSE, start)
    return text[start:] if end < 0 else text[start:end]  # an unclosed (truncated) think block runs to the end


LANGUAGES = ("en", "zh")


def language_consistency(text: str, language: str = "en") -> float:
    """Share of the words of the chain of thought (the first <think> block's content if the text has a <think>
    tag, else the whole text) that are in `language` ("en" or "zh"); 0.0 when there are no words.

    Raises ValueError for an unsupported language; never raises for any `text`."""
    if language not in LANGUAGES:
        raise ValueError(f"language_consistency: unsupported language {language!r}; supported: {', '.join(LANGUAGES)}")
    if not isinstance(text, str):
        return 0.0
    content = _think_content(text)
    if content.isascii():  # fast exact path: every word is ASCII, so the answer is all or nothing
        encoded = content.encode("ascii")
        has_word = len(encoded.translate(None, _ASCII_ALNUM)) < len(encoded)
        return 1.0 if has_word and language == "en" else 0.0
    words = good = 0
    for part in _language_sample(content):
        words += _count(_WORD, part)
        good += _count(_ASCII_WORD if language == "en" else _CJK_CHAR, part)
    return good / words if words else 0.0


_INTEGER = re.compile(rf"[+-]?[0-9]{{1,{MAX_INT_ANSWER_DIGITS}}}")


def arithmetic_accuracy(text: str, answer: int) -> float:
    """1.0 iff the last <answer> block, stripped of whitespace, is exactly an optionally signed integer of ASCII
    digits (at most MAX_INT_ANSWER_DIGITS of them; leading zeros allowed) equal to `answer`."""
    try:
        if not isinstance(text, str):
            return 0.0
        span = _last_answer_span(text)
        if span is None:
            return 0.0
        content = text[span[0]:span[1]].strip()
        if len(content) > MAX_INT_ANSWER_DIGITS + 1 or _INTEGER.fullmatch(content) is None:
            return 0.0
        return 1.0 if int(content) == answer else 0.0
    except Exception:  # defensive: a strange `answer` argument
        return 0.0


# name -> reward(text, **args) -> float. Adding a reward: write the function above, add one line here.
REWARDS: dict[str, Callable[..., float]] = {
    "countdown_accuracy": countdown_accuracy,
    "arithmetic_accuracy": arithmetic_accuracy,
    "format": format_reward,
    "language_consistency": language_consistency,
}


def get_reward(name: str) -> Callable[..., float]:
    """The reward function registered under `name`; ValueError listing the known names otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}") from None
