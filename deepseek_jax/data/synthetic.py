"""A synthetic arithmetic pretraining corpus: text that teaches a tiny base model numbers and expressions.

Why it does not leak Countdown (the task of `deepseek_jax.rl.tasks`). The corpus teaches a tiny base model
to read and write numbers and expressions before RL: one-operation facts ("17 + 25 = 42"), step-by-step evaluations
of random expressions with 2-4 operands in [1, 100] whose every intermediate result is a non-negative integer, times
tables, sentences ("The product of 6 and 7 is 42."), and worked examples in the `<think> ... </think> <answer> ...
</answer>` format for questions like "Compute (6 * 7) - 9.", answered with the value or with the equation "(6 * 7) -
9 = 33" -- the only format prior the model gets. Every document only ever evaluates a given expression forwards
(expression -> value). It never poses the Countdown problem, i.e. the inverse search "reach target T using these
numbers, each exactly once": no document lists a set of numbers together with a target, asks for an expression, or
uses the wording of the Countdown templates ("Using the numbers", "create an equation", "each number exactly once",
"Make ... from ..."). That an expression such as "(6 * 7) - 9 = 33" could also be a Countdown solution is
unavoidable for arithmetic text and harmless: the model still has to search for one, which is what RL must teach.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

_CORPUS_MIN_CHARS, _CORPUS_MAX_CHARS = 1000, 3000
_MAX_PRODUCT = 10_000  # keeps every intermediate result of the corpus at most a few digits


@dataclass
class _Node:
    value: int
    text: str
    steps: list[str]  # "x op y = v" for every operation, in evaluation order
    leaf: bool

    def wrapped(self) -> str:
        return self.text if self.leaf else f"({self.text})"


def _leaf(value: int) -> _Node:
    return _Node(value, str(value), [], True)


def _join(x: _Node, op: str, y: _Node, value: int) -> _Node:
    steps = [*x.steps, *y.steps, f"{x.value} {op} {y.value} = {value}"]
    return _Node(value, f"{x.wrapped()} {op} {y.wrapped()}", steps, False)


def _with_leaf(rng: random.Random, left: _Node) -> _Node:
    """`left op n` for a fresh operand n in [1, 100] chosen so the result is a non-negative integer."""
    v = left.value
    choices = ["+"]
    if v >= 1:
        choices.append("-")
    if v <= _MAX_PRODUCT // 2:
        choices.append("*")
    divisors = [d for d in range(2, min(v - 1, 100) + 1) if v % d == 0]  # proper divisors: no "77 / 77 = 1"
    if divisors:
        choices.append("/")
    op = rng.choice(choices)
    if op == "+":
        n = rng.randint(1, 100)
        node = _join(left, "+", _leaf(n), v + n)
        return node if rng.random() < 0.5 else _join(_leaf(n), "+", left, v + n)
    if op == "-":
        n = rng.randint(1, min(v, 100))
        return _join(left, "-", _leaf(n), v - n)
    if op == "*":
        n = rng.randint(1, max(1, min(100, _MAX_PRODUCT // max(v, 1))))
        return _join(left, "*", _leaf(n), v * n) if rng.random() < 0.5 else _join(_leaf(n), "*", left, v * n)
    n = rng.choice(divisors)
    return _join(left, "/", _leaf(n), v // n)


def _corpus_expression(rng: random.Random, operands: int) -> _Node:
    """A random expression over `operands` numbers in [1, 100]; every intermediate result is an integer >= 0."""
    if operands == 1:
        return _leaf(rng.randint(1, 100))
    left_size = rng.randint(1, operands - 1)
    left = _corpus_expression(rng, left_size)
    if operands - left_size == 1:
        return _with_leaf(rng, left)
    right = _corpus_expression(rng, operands - left_size)
    x, y = (left, right) if rng.random() < 0.5 else (right, left)
    ops = ["+"]
    if x.value * y.value <= _MAX_PRODUCT:
        ops.append("*")
    if x.value != y.value:
        ops.append("-")
    op = rng.choice(ops)
    if op == "-":
        x, y = (x, y) if x.value > y.value else (y, x)
        return _join(x, "-", y, x.value - y.value)
    return _join(x, op, y, x.value + y.value if op == "+" else x.value * y.value)


def _section_facts(rng: random.Random) -> str:
    return "\n".join(_corpus_expression(rng, 2).steps[-1] for _ in range(rng.randint(4, 9)))


def _section_sentences(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        node = _corpus_expression(rng, 2)
        a, op, b, _, value = node.steps[-1].split(" ")
        if op == "/":
            lines.append(f"{a} divided by {b} is {value}.")
        elif op == "-":
            lines.append(f"The difference between {a} and {b} is {value}.")
        else:
            lines.append(f"The {'sum' if op == '+' else 'product'} of {a} and {b} is {value}.")
    return "\n".join(lines)


_STEP_WORDS = ("First", "Then", "Next", "After that")


def _narrated_steps(steps: list[str]) -> list[str]:
    out = [f"{_STEP_WORDS[min(k, len(_STEP_WORDS) - 1)]}, {step}." for k, step in enumerate(steps[:-1])]
    out.append(f"{'Finally, ' if len(steps) > 1 else ''}{steps[-1]}.")
    return out


def _section_evaluation(rng: random.Random) -> str:
    node = _corpus_expression(rng, rng.randint(2, 4))
    lead = rng.choice(("Evaluate", "Work out", "Simplify"))
    steps = _narrated_steps(node.steps) if len(node.steps) > 1 else []
    return "\n".join([f"{lead} {node.text}.", *steps, f"So {node.text} = {node.value}."])


def _section_worked_example(rng: random.Random) -> str:
    node = _corpus_expression(rng, rng.randint(2, 4))
    question = rng.choice(("Compute", "Calculate", "What is"))
    question = f"{question} {node.text}{'?' if question == 'What is' else '.'}"
    think = " ".join(_narrated_steps(node.steps))
    sep = rng.choice((" ", "\n"))
    answer = rng.choice((str(node.value), f"{node.text} = {node.value}"))  # a value, or the checked equation
    return f"{question}\n<think> {think} </think>{sep}<answer> {answer} </answer>"


def _small_expression(rng: random.Random, operands: int) -> _Node:
    """Operands in [1, 12] joined left to right by + - * / with every result a non-negative integer."""
    return _chain(rng, [rng.randint(1, 12) for _ in range(operands)])


def chain_ops(value: int, n: int) -> dict[str, int]:
    """{op: value op n} for the ops of a left-to-right step that keep the result a non-negative integer (n >= 1)."""
    out = {"+": value + n, "*": value * n}
    if value >= n:
        out["-"] = value - n
    if value % n == 0:
        out["/"] = value // n
    return out


def _chain(rng: random.Random, numbers: list[int]) -> _Node:
    """`numbers` (each once, in this order) joined left to right by + - * /, every result a non-negative integer;
    a commutative step puts the new number on either side."""
    node = _leaf(numbers[0])
    for n in numbers[1:]:
        ops = chain_ops(node.value, n)
        op = rng.choice(sorted(ops, key="+*-/".index))
        value = ops[op]
        in_front = rng.random() < 0.3 and op in "+*"  # commutative: either side
        node = _join(_leaf(n), op, node, value) if in_front else _join(node, op, _leaf(n), value)
    return node


def _listed(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"


def _section_combine(rng: random.Random) -> str:
    """Small numbers, listed in a shuffled order, combined into an expression and evaluated (plain or worked)."""
    lines = []
    for _ in range(rng.randint(2, 5)):
        node = _small_expression(rng, rng.randint(2, 3))
        numbers = [int(t) for t in node.text.replace("(", " ").replace(")", " ").split() if t.isdigit()]
        rng.shuffle(numbers)
        if rng.random() < 0.5:
            lines.append(f"Combine {_listed(numbers)}: {node.text} = {node.value}.")
        else:
            think = " ".join(_narrated_steps(node.steps))
            lines.append(f"Combine {_listed(numbers)}.\n<think> {think} </think> <answer> {node.text} = {node.value} "
                         "</answer>")
    return "\n".join(lines)


_EXERCISE_WORDS = ("Exercise", "Problem", "Question", "Item")


def _section_explore(rng: random.Random, max_number: int = 12, sizes: tuple[int, ...] = (2, 3),
                     labels: bool = False) -> str:
    """One set of numbers in [1, max_number] (how many: drawn from `sizes`) combined in 1-8 ways with different
    results, each evaluated step by step in the think block ("3 + 8 = 11, 11 * 9 = 99."); the answer restates the
    last one as one expression. With `labels`, half the sets carry an exercise number in front ("Exercise 14.
    Combine ..."), a number the tries never use. Forward evaluation only (no target is ever named): which try to
    stop at is what RL has to learn."""
    numbers = [rng.randint(1, max_number) for _ in range(rng.choice(sizes))]
    tries: dict[int, _Node] = {}
    want = rng.randint(1, 8)
    for _ in range(4 * want):
        if len(tries) == want:
            break
        node = _chain(rng, rng.sample(numbers, len(numbers)))
        tries.setdefault(node.value, node)
    think = " ".join(", ".join(node.steps) + "." for node in tries.values())
    last = list(tries.values())[-1]
    rng.shuffle(numbers)
    label = f"{rng.choice(_EXERCISE_WORDS)} {rng.randint(1, 60)}. " if labels and rng.random() < 0.5 else ""
    return f"{label}Combine {_listed(numbers)}.\n<think> {think} </think> <answer> {last.text} = {last.value} </answer>"


def _section_table(rng: random.Random) -> str:
    n = rng.randint(2, 12)
    start = rng.randint(1, 6)
    return f"Multiples of {n}:\n" + "\n".join(f"{n} * {k} = {n * k}" for k in range(start, start + rng.randint(4, 8)))


_Mix = tuple[tuple[Callable[[random.Random], str], int], ...]
CORPORA: dict[str, _Mix] = {
    # everything: multi-digit facts, evaluations, worked examples, tables, small-number combinations
    "arithmetic": ((_section_facts, 2), (_section_sentences, 1), (_section_evaluation, 2),
                   (_section_worked_example, 2), (_section_table, 1), (_section_combine, 8)),
    # the laptop-scale base: small-number combinations and times tables only, which a tiny model learns to
    # copy and evaluate in ~1000 steps (with the full mix it has not learned to copy the listed numbers by then)
    "combine": ((_section_combine, 8), (_section_table, 1)),
    # explorations: several ways to combine the same numbers, evaluated one after another, and times tables
    "explore": ((_section_explore, 8), (_section_table, 1)),
    # the same in the Countdown task's range, mostly 3 numbers, half with an exercise number in front: the tiny base
    # copies the listed numbers far better (tries with a wrong number 52% -> 6.4%, README), a number before "Combine"
    # no longer throws it off
    "explore10": ((functools.partial(_section_explore, max_number=10, sizes=(2, 3, 3, 3), labels=True), 8),
                  (_section_table, 1)),
}
_TITLES = ("Arithmetic practice", "Worked examples", "Notes on arithmetic", "Exercises with answers",
           "Mental math", "Step by step")


def _corpus_document(rng: random.Random, mix: _Mix) -> str:
    budget = rng.randint(_CORPUS_MIN_CHARS, _CORPUS_MAX_CHARS - 400)
    parts = [rng.choice(_TITLES)]
    size = len(parts[0])
    sections, weights = zip(*mix, strict=True)
    while size < budget:
        section = rng.choices(sections, weights)[0](rng)
        if size + 2 + len(section) > _CORPUS_MAX_CHARS:
            if size >= _CORPUS_MIN_CHARS:
                break
            continue
        parts.append(section)
        size += 2 + len(section)
    return "\n\n".join(parts) + "\n"


def arithmetic_corpus(seed: int, n_docs: int, mix: str = "arithmetic") -> list[str]:
    """`n_docs` synthetic arithmetic documents of ~1-3k characters (see the module docstring), sections drawn by
    the weights of CORPORA[mix]. Document `k` depends only on (seed, k), so a longer corpus extends a shorter one."""
    if mix not in CORPORA:
        raise ValueError(f"unknown corpus mix {mix!r}; available: {', '.join(CORPORA)}")
    return [_corpus_document(random.Random(f"arithmetic-corpus:{seed}:{k}"), CORPORA[mix]) for k in range(n_docs)]
