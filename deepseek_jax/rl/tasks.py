"""Verifiable tasks for R1-Zero-style RL at laptop scale.

A task turns a seed into problems (a prompt, the arguments its rule-based rewards need, a reference solution)
and scores completions with the rewards of `deepseek_jax.rl.rewards`. Pure Python, deterministic and seeded.

* `Countdown`: given 3-4 numbers and a target, write an expression that uses each number exactly once with
  + - * / and equals the target (the TinyZero task). Problems are built from a random expression tree over all
  the numbers, so every target is reachable and the tree is the reference answer.
* `Arithmetic`: compute `a op b` for multi-digit integers; the answer is one integer.

Determinism and the train/eval split. Problem `i` of a stream is drawn from its own `random.Random` seeded with
the string "<task>:<seed>:<stream>:<i>:<attempt>" (string seeds go through SHA-512, so they do not depend on
PYTHONHASHSEED, the platform or the order of calls). The eval set is the first `eval_size` distinct problems of
the "eval" stream, in a fixed order; `train_problem(i)` draws from the "train" stream and redraws (next attempt)
while the problem's key -- (sorted numbers, target) for Countdown, (a, op, b) for Arithmetic -- is one of the
eval keys, so the infinite train stream never contains an eval problem. Train problems may repeat among
themselves. A problem space too small for `eval_size` distinct problems raises ValueError at construction.

Prompts and scoring. Templates live in `TEMPLATES[template][task]` (adding a template is one entry). Every
template ends with an opening `<think>` tag, R1-Zero style: the model continues the reasoning it was prompted to
start. `score(problem, completion)` takes only what the model generated after the prompt and, when the prompt ends
with `<think>`, prepends that tag, so the format reward judges the whole assistant response
("<think>" + completion).

The pretraining corpus these tasks assume lives in `deepseek_jax.data.synthetic`.
"""

from __future__ import annotations

import abc
import operator
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from deepseek_jax.rl.rewards import (
    MAX_LITERAL_DIGITS,
    THINK_OPEN,
    apply_op,
    arithmetic_accuracy,
    countdown_accuracy,
    format_reward,
    language_consistency,
)


@dataclass(frozen=True)
class Problem:
    """One task instance. `reward_args` are the keyword arguments of the task's accuracy reward (treat it as
    read-only); `answer` is a reference solution in the form the accuracy reward expects inside <answer>;
    `key` identifies the problem for the train/eval split."""

    prompt: str
    reward_args: dict = field(hash=False)
    answer: str
    key: tuple = ()


# ---------------------------------------------------------------------------------------------------------------
# Prompt templates: TEMPLATES[template name][task name] is a str.format string.
#   countdown fields: numbers ("[3, 7, 25]"), numbers_plain ("3 7 25"), numbers_listed ("3, 7 and 25"), target
#   arithmetic fields: expression ("123 * 45")
# ---------------------------------------------------------------------------------------------------------------

_R1_SYSTEM = (
    "The following is a conversation between a User and an Assistant. The User poses a problem and the Assistant "
    "solves it. The Assistant first works the problem out step by step, writing that reasoning between <think> "
    "and </think>, and then states the final result between <answer> and </answer>, like this: "
    "<think> reasoning </think> <answer> result </answer>.\n"
)


def _r1(question: str) -> str:
    return f"{_R1_SYSTEM}User: {question}\nAssistant: {THINK_OPEN}"


TEMPLATES: dict[str, dict[str, str]] = {
    "r1": {
        "countdown": _r1("Using the numbers {numbers}, create an equation that equals {target}. Use + - * / and "
                         "parentheses, and use each number exactly once. Put only the expression inside the answer "
                         "tags, for example <answer> (1 + 2) * 3 </answer>."),
        "arithmetic": _r1("Compute {expression}. Put only the resulting integer inside the answer tags."),
    },
    "compact": {
        "countdown": "Make {target} from {numbers_plain} with + - * /, each once.\n" + THINK_OPEN,
        "arithmetic": "Compute {expression}.\n" + THINK_OPEN,
    },
    "reach": {  # the target, then a line worded as the corpus's "Combine 3, 7 and 25." examples
        "countdown": "Reach {target}. Combine {numbers_listed}.\n" + THINK_OPEN,
        "arithmetic": "Compute {expression}.\n" + THINK_OPEN,
    },
    "combine": {  # the wording of the synthetic corpus's "Combine 3, 7 and 25." examples, plus the target
        "countdown": "Combine {numbers_listed} to reach {target}, each number once.\n" + THINK_OPEN,
        "arithmetic": "Compute {expression}.\n" + THINK_OPEN,
    },
}


def _template(template: str, task: str) -> str:
    if template not in TEMPLATES or task not in TEMPLATES[template]:
        known = sorted(name for name, per_task in TEMPLATES.items() if task in per_task)
        raise ValueError(f"unknown template {template!r} for task {task!r}; available: {', '.join(known)}")
    return TEMPLATES[template][task]


def full_response(prompt: str, completion: str) -> str:
    """The whole assistant response: the completion, with the prompt's trailing opening <think> tag put back."""
    return THINK_OPEN + completion if prompt.rstrip().endswith(THINK_OPEN) else completion


def _int_range(value: int | Sequence[int], name: str, low: int, high: int) -> tuple[int, int]:
    try:
        lo = hi = operator.index(value)  # one int (numpy ints too)
    except TypeError:
        try:
            lo, hi = (operator.index(v) for v in value)  # a (min, max) pair, e.g. a list from a config file
        except (TypeError, ValueError):
            lo, hi = high + 1, low  # reported below
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must be an int or a (min, max) pair within [{low}, {high}], got {value!r}")
    return lo, hi


_MAX_ATTEMPTS = 10_000  # redraws of one train problem that collides with the eval set before giving up


class _Task(abc.ABC):
    """The stream / eval-set machinery shared by the tasks. A subclass sets `name` and `_accuracy` and
    implements `_sample(rng) -> Problem`."""

    name: str
    reward_names: tuple[str, ...] = ("accuracy", "format")
    _accuracy: Callable[..., float]

    def __init__(self, seed: int, eval_size: int, template: str, language: str = ""):
        if eval_size < 0:
            raise ValueError(f"eval_size must be >= 0, got {eval_size}")
        if language:
            language_consistency("", language)  # an unsupported language is a ValueError now, not mid-run
            self.reward_names = (*self.reward_names, "language")
        self.language = language
        self.seed = seed
        self.eval_size = eval_size
        self.template = template
        self._prompt_format = _template(template, self.name)
        self._eval = self._build_eval()
        self._eval_keys = frozenset(p.key for p in self._eval)

    def _rng(self, stream: str, i: int, attempt: int = 0) -> random.Random:
        return random.Random(f"{self.name}:{self.seed}:{stream}:{i}:{attempt}")

    @abc.abstractmethod
    def _sample(self, rng: random.Random) -> Problem:
        """One problem drawn with `rng`."""

    def _build_eval(self) -> list[Problem]:
        problems: list[Problem] = []
        seen: set[tuple] = set()
        for j in range(50 * self.eval_size + 1000):
            if len(problems) == self.eval_size:
                return problems
            p = self._sample(self._rng("eval", j))
            if p.key not in seen:
                seen.add(p.key)
                problems.append(p)
        if len(problems) < self.eval_size:
            raise ValueError(f"{self.name}: could not draw {self.eval_size} distinct eval problems (got "
                             f"{len(problems)}); the problem space is too small for this eval_size")
        return problems

    @property
    def eval_keys(self) -> frozenset:
        """The keys the train stream never draws: the eval set's, and any held out with `holding_out`."""
        return self._eval_keys

    def holding_out(self, keys: frozenset) -> _Task:
        """This task, its train stream also kept clear of `keys` (another task's eval set); returns self."""
        self._eval_keys = self._eval_keys | keys
        return self

    def eval_problems(self) -> list[Problem]:
        """The fixed eval set: `eval_size` distinct problems, the same for the same seed and settings."""
        return list(self._eval)

    def train_problem(self, i: int) -> Problem:
        """Problem `i` of the infinite train stream (never an eval problem)."""
        if i < 0:
            raise ValueError(f"train problem index must be >= 0, got {i}")
        for attempt in range(_MAX_ATTEMPTS):
            p = self._sample(self._rng("train", i, attempt))
            if p.key not in self._eval_keys:
                return p
        raise RuntimeError(f"{self.name}: train problem {i} kept colliding with the eval set")

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        """{reward name: value} for a completion (the text generated after `problem.prompt`); with a `language`,
        also R1's language consistency of the chain of thought."""
        text = full_response(problem.prompt, completion)
        out = {"accuracy": self._accuracy(text, **problem.reward_args), "format": format_reward(text)}
        return out | ({"language": language_consistency(text, self.language)} if self.language else {})


# ---------------------------------------------------------------------------------------------------------------
# Countdown
# ---------------------------------------------------------------------------------------------------------------

_OPS = "+-*/"


def _natural(v: Fraction) -> bool:
    return v.denominator == 1 and v > 0


def _countdown_tree(rng: random.Random, numbers: list[int], max_target: int) -> tuple[str, int] | None:
    """A random binary expression tree over all of `numbers` (each exactly once); returns (expression, value) or
    None when no final combination lands on an integer in [1, max_target].

    Repeatedly joins two random nodes of the pool. Each join prefers (95%) operations whose result is a positive
    integer, choosing the operation uniformly among those available, so reference solutions read naturally
    (no "(3 - 7) / 2" unless nothing else works); the last join only keeps results in [1, max_target]."""
    pool: list[tuple[Fraction, str, bool]] = [(Fraction(x), str(x), True) for x in numbers]  # (value, text, leaf)
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        rest = [node for k, node in enumerate(pool) if k != i and k != j]
        last = not rest
        by_op: dict[str, list[tuple[Fraction, tuple, tuple]]] = {}
        fallback: list[tuple[str, Fraction, tuple, tuple]] = []
        for x, y in ((a, b), (b, a)):
            for op in _OPS:
                v = apply_op(op, x[0], y[0])
                if v is None:
                    continue
                if last and not (v.denominator == 1 and 1 <= v <= max_target):
                    continue
                fallback.append((op, v, x, y))
                if _natural(v):
                    by_op.setdefault(op, []).append((v, x, y))
        if by_op and rng.random() < 0.95:
            op = rng.choice(sorted(by_op))
            v, x, y = rng.choice(by_op[op])
        elif fallback:
            op, v, x, y = rng.choice(fallback)
        else:
            return None
        text = " ".join((x[1] if x[2] else f"({x[1]})", op, y[1] if y[2] else f"({y[1]})"))
        pool = [*rest, (v, text, False)]
    value, text, _ = pool[0]
    if value.denominator != 1 or not 1 <= value <= max_target:  # only reachable for a single number
        return None
    return text, int(value)


class Countdown(_Task):
    """Countdown: reach `target` from the given numbers with + - * /, using each number exactly once.

    `num_numbers` is how many numbers a problem has (an int, or an inclusive (min, max) range; at most 8, so a
    reference answer stays well inside the reward's token bounds), the numbers are in [1, max_number], the target
    is an integer in [1, max_target]. Rewards: accuracy (`countdown_accuracy`), format (`format_reward`), and
    with a `language` ("en", "zh") R1's language consistency (`language_consistency`)."""

    name = "countdown"
    _accuracy = staticmethod(countdown_accuracy)

    def __init__(self, seed: int = 0, num_numbers: int | Sequence[int] = (3, 4), max_number: int = 25,
                 max_target: int = 100, eval_size: int = 200, template: str = "r1", language: str = ""):
        self.num_numbers = _int_range(num_numbers, "num_numbers", 2, 8)
        if not 1 <= max_number < 10**MAX_LITERAL_DIGITS:
            raise ValueError(f"max_number must be in [1, {10**MAX_LITERAL_DIGITS - 1}], got {max_number}")
        if max_target < 1:
            raise ValueError(f"max_target must be >= 1, got {max_target}")
        self.max_number = max_number
        self.max_target = max_target
        super().__init__(seed, eval_size, template, language)

    def _sample(self, rng: random.Random) -> Problem:
        lo, hi = self.num_numbers
        for _ in range(_MAX_ATTEMPTS):  # a tree lands in range within a few tries for any sane settings
            numbers = [rng.randint(1, self.max_number) for _ in range(rng.randint(lo, hi))]
            built = _countdown_tree(rng, numbers, self.max_target)
            if built is None:
                continue
            expression, target = built
            if countdown_accuracy(f"<answer>{expression}</answer>", numbers, target) != 1.0:  # belt and braces
                continue
            listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
            prompt = self._prompt_format.format(numbers="[" + ", ".join(map(str, numbers)) + "]",
                                                numbers_plain=" ".join(map(str, numbers)), numbers_listed=listed,
                                                target=target)
            return Problem(prompt=prompt, reward_args={"numbers": list(numbers), "target": target},
                           answer=expression, key=(tuple(sorted(numbers)), target))
        raise RuntimeError(f"countdown: no problem found in {_MAX_ATTEMPTS} tries; are the settings satisfiable?")


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------------------

_INT_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class Arithmetic(_Task):
    """Compute `a op b` exactly: op in `ops` (a subset of "+", "-", "*"), each operand has a number of digits in
    `digits` (an int, or an inclusive (min, max) range within [1, 9]; one digit means 1-9). The result may be
    negative. Rewards: accuracy (`arithmetic_accuracy`), format (`format_reward`)."""

    name = "arithmetic"
    _accuracy = staticmethod(arithmetic_accuracy)

    def __init__(self, seed: int = 0, digits: int | Sequence[int] = (2, 3), ops: Sequence[str] = ("+", "-", "*"),
                 eval_size: int = 200, template: str = "r1", language: str = ""):
        self.digits = _int_range(digits, "digits", 1, 9)
        ops = tuple(ops)
        if not ops or any(op not in _INT_OPS for op in ops):
            raise ValueError(f"ops must be a non-empty subset of {sorted(_INT_OPS)}, got {ops!r}")
        self.ops = ops
        super().__init__(seed, eval_size, template, language)

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(*self.digits)
        return rng.randint(10 ** (d - 1), 10**d - 1)

    def _sample(self, rng: random.Random) -> Problem:
        a, op, b = self._operand(rng), rng.choice(self.ops), self._operand(rng)
        result = _INT_OPS[op](a, b)
        expression = f"{a} {op} {b}"
        return Problem(prompt=self._prompt_format.format(expression=expression), reward_args={"answer": result},
                       answer=str(result), key=(a, op, b))


TASKS: dict[str, type[_Task]] = {"countdown": Countdown, "arithmetic": Arithmetic}


def make_task(name: str, **kwargs) -> _Task:
    """The task registered as `name`, constructed with `kwargs`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)
