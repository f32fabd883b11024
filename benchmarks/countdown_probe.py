"""What a Countdown policy does on the held-out problems, try by try: the diagnosis behind the R1-Zero README rows.

  python benchmarks/countdown_probe.py runs/r1zero/base            # greedy, as eval_accuracy scores it
  python benchmarks/countdown_probe.py runs/r1zero/grpo --temperature=1

For the first `--problems` held-out problems of configs/countdown_r1zero.py's GRPO task it decodes one completion
each and splits the think block into tries ("4 + 10 = 14, 14 - 3 = 11."). It reports the accuracy; how many tries
the model makes; how often the target is the value of some try (the ceiling for a policy that only has to stop at
the right one); how many tries use a number that is not one of the listed ones left (a wrong copy); and how many
single steps "a op b = v" are wrong.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from fractions import Fraction

import jax
import numpy as np

from configs import countdown_r1zero
from deepseek_jax.checkpoint import load_run
from deepseek_jax.data import run_tokenizer
from deepseek_jax.rl.rewards import apply_op
from deepseek_jax.rl.rollout import sample
from deepseek_jax.rl.tasks import make_task

_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def probe_try(text: str, numbers: list[int]) -> tuple[int | None, bool, int, int]:
    """(the try's final value, whether it used exactly the listed numbers, its wrong steps, its steps)."""
    pool, previous, wrong, steps = list(numbers), None, 0, _STEP.findall(text)
    copied = True
    for a, op, b, v in steps:
        a, b, v = int(a), int(b), int(v)
        wrong += apply_op(op, Fraction(a), Fraction(b)) != v
        for x in ([a, b] if previous is None else [b if a == previous else a]):
            if x in pool:
                pool.remove(x)
            else:
                copied = False
        previous = v
    return previous, copied and not pool, wrong, len(steps)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)

    grpo = countdown_r1zero.get_config().grpo
    rl = grpo.rl
    task = make_task(rl.task, seed=grpo.seed, **rl.task_args.to_dict())
    problems = task.eval_problems()[:args.problems]
    cfg, params, step = load_run(args.workdir)
    sampling = dict(temperature=args.temperature, key=jax.random.key(0)) if args.temperature else {}
    _, _, texts = sample(cfg, params, run_tokenizer(args.workdir), [p.prompt for p in problems],
                         max_prompt_tokens=rl.max_prompt_tokens, max_new_tokens=rl.max_new_tokens, stop=list(rl.stop),
                         **sampling)
    accuracy, covered, tries, bad_copy, bad_steps, steps = [], [], [], 0, 0, 0
    for problem, text in zip(problems, texts, strict=True):
        think = text.split("</think>")[0]
        found = [probe_try(t, problem.reward_args["numbers"]) for t in think.split(".") if _STEP.search(t)]
        accuracy.append(task.score(problem, text)["accuracy"])
        covered.append(any(value == problem.reward_args["target"] for value, *_ in found))
        tries.append(len(found))
        bad_copy += sum(not ok for _, ok, _, _ in found)
        bad_steps += sum(w for *_, w, _ in found)
        steps += sum(n for *_, n in found)
    out = {"accuracy": float(np.mean(accuracy)), "target_among_tries": float(np.mean(covered)),
           "tries": float(np.mean(tries)), "wrong_copy_share": bad_copy / max(sum(tries), 1),
           "wrong_step_share": bad_steps / max(steps, 1)}
    print(f"{args.workdir} step {step}, temperature {args.temperature}: " +
          ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    print("tries per completion:", dict(sorted(collections.Counter(tries).items())))
    for problem, text in list(zip(problems, texts, strict=True))[:3]:
        print(repr(problem.prompt), "->", repr(text))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
