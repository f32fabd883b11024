"""Cold-start data for R1 (R1 sec. 2.3.1): long chains of thought in the <think> / <answer> format, written by a
program rather than a model.

For a Countdown problem the writer searches the way a person at the table would: it combines the numbers left to
right in some order (each once, keeping every result a non-negative integer), evaluates each try step by step and
checks it against the target -- "7 - 3 = 4, 4 * 5 = 20, not 46." -- until a try reaches it -- "3 * 7 = 21,
25 + 21 = 46, that is 46." -- then states that try as one expression in the answer. The tries before the hit are
drawn at random from the other values the numbers make (at most `max_misses` of them), so the traces vary in
length the way a search does. Problems whose target no left-to-right try reaches (e.g. only 7 - (9 / 3) makes 4)
get no trace.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence

from deepseek_jax.data.synthetic import chain_ops
from deepseek_jax.rl.tasks import Problem


def chains(numbers: Sequence[int]) -> Iterator[tuple[str, int, tuple[str, ...]]]:
    """Every (expression, value, steps) that joins `numbers` left to right, in every order, with + - * / (a
    commutative step also with the new number in front), every intermediate result a non-negative integer; each
    text once. `steps` are the evaluations in order, as "11 * 9 = 99"."""
    seen = set()
    for order in sorted(set(itertools.permutations(numbers))):
        partial = [(str(order[0]), order[0], ())]  # (text, value, steps so far); no steps: a single number
        for n in order[1:]:
            grown = []
            for text, value, steps in partial:
                inner = f"({text})" if steps else text
                for op, v in chain_ops(value, n).items():
                    grown.append((f"{inner} {op} {n}", v, (*steps, f"{value} {op} {n} = {v}")))
                    if op in "+*":
                        grown.append((f"{n} {op} {inner}", v, (*steps, f"{n} {op} {value} = {v}")))
            partial = grown
        for text, value, steps in partial:
            if text not in seen:
                seen.add(text)
                yield text, value, steps


def search_trace(problem: Problem, rng: random.Random, max_misses: int = 5) -> str | None:
    """The reply to a Countdown prompt that ends with <think>: a written search, then the answer; None when no
    left-to-right try reaches the target."""
    numbers, target = problem.reward_args["numbers"], problem.reward_args["target"]
    by_value: dict[int, tuple[str, tuple[str, ...]]] = {}
    for text, value, steps in sorted(chains(numbers)):
        by_value.setdefault(value, (text, steps))
    if target not in by_value:
        return None
    hit, hit_steps = by_value.pop(target)
    misses = rng.sample(sorted(by_value.items()), min(rng.randint(0, max_misses), len(by_value)))
    tries = [f"{', '.join(steps)}, not {target}." for _, (_, steps) in misses]
    tries.append(f"{', '.join(hit_steps)}, that is {target}.")
    return f" {' '.join(tries)} </think> <answer> {hit} = {target} </answer>"


def coldstart_examples(task, n: int, seed: int = 0, max_misses: int = 5) -> list[dict]:
    """`n` SFT examples ({"prompt", "response"}) on the first problems of the task's train stream that a
    left-to-right try solves."""
    rng = random.Random(f"coldstart:{seed}")
    examples, i = [], 0
    while len(examples) < n:
        problem = task.train_problem(i)
        trace = search_trace(problem, rng, max_misses)
        if trace is not None:
            examples.append({"prompt": problem.prompt, "response": trace})
        i += 1
    return examples
