"""A curriculum for GRPO: train problems from easier settings of the task first, harder as the policy improves.

Level k of the train stream is the task with `task_args[arg] = levels[k]` (e.g. arg "num_numbers", levels (2, 3):
targets reachable from 2 numbers, then from 3). The level rises when the running accuracy -- an exponential
moving average of each step's sampled accuracy, a_t = ema * a_{t-1} + (1 - ema) * acc_t -- reaches `advance_at`;
the average restarts at 0 on every rise. The eval set is the task of `task_args` itself and stays fixed; no level
ever draws one of its problems. The level and the running accuracy are the curriculum's whole state, saved with
every checkpoint so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deepseek_jax.rl.tasks import Problem, make_task


class Curriculum:
    """The train stream of a task, by level; `task` is the fixed final task (eval set, scoring)."""

    def __init__(self, name: str, seed: int, task_args: dict[str, Any], arg: str = "", levels: Sequence = (),
                 advance_at: float = 0.5, ema: float = 0.9):
        if levels and not arg:
            raise ValueError("rl.curriculum.levels is set but rl.curriculum.arg is empty: name the task argument "
                             "the levels set, e.g. arg='num_numbers'")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"rl.curriculum.ema must be in [0, 1), got {ema}")
        self.task = make_task(name, seed=seed, **task_args)
        self.levels = [make_task(name, seed=seed, **(task_args | {arg: value, "eval_size": 0})).holding_out(
            self.task.eval_keys) for value in levels]
        self.advance_at, self.ema = advance_at, ema
        self.level, self.running = 0, 0.0

    def train_problem(self, i: int) -> Problem:
        """Problem `i` of the current level's train stream (of the task itself without levels)."""
        return self.levels[self.level].train_problem(i) if self.levels else self.task.train_problem(i)

    def observe(self, accuracy: float) -> None:
        """Fold one step's sampled accuracy into the running accuracy; rise a level when it reaches advance_at."""
        if not self.levels:
            return
        self.running = self.ema * self.running + (1.0 - self.ema) * accuracy
        if self.running >= self.advance_at and self.level < len(self.levels) - 1:
            self.level, self.running = self.level + 1, 0.0

    def state(self) -> dict[str, float]:
        return {"curriculum_level": self.level, "running_accuracy": self.running}

    def load(self, state: dict[str, Any]) -> None:
        self.level = int(state.get("curriculum_level", 0))
        self.running = float(state.get("running_accuracy", 0.0))
