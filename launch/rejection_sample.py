"""Rejection sampling (R1 stage 3): sample N completions per problem from a checkpoint, keep the rewarded ones,
and write an SFT jsonl ({"prompt", "response"}) for `--config.stage=sft`.

  python -m launch.rejection_sample --workdir=runs/r1zero/grpo --n=8 --problems=256 --out=runs/sft.jsonl

The task and its settings (rl.task, rl.task_args, lengths, stop strings) default to the run's own config.json
(a GRPO run has them); --task and --task_args (JSON) override them. Problems come from the task's train stream.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from deepseek_jax.checkpoint import CheckpointError, load_run
from deepseek_jax.data import run_tokenizer
from deepseek_jax.rl.rejection import rejection_sample, write_jsonl
from deepseek_jax.rl.tasks import make_task


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a launch.train run (its latest checkpoint and tokenizer)")
    ap.add_argument("--out", required=True, help="the SFT jsonl to write")
    ap.add_argument("--n", type=int, default=8, help="completions sampled per problem")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--first_problem", type=int, default=0, help="index into the task's train stream")
    ap.add_argument("--task", default=None, help="task name (default: the run's rl.task)")
    ap.add_argument("--task_args", default=None, help="task arguments as JSON (default: the run's rl.task_args)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        cfg, params, step = load_run(args.workdir)
        with open(os.path.join(args.workdir, "config.json")) as f:
            rl = json.load(f).get("rl", {})
        name = args.task or rl.get("task")
        if not name:
            raise ValueError("the run's config.json names no rl.task: give --task (e.g. countdown)")
        task_args = json.loads(args.task_args) if args.task_args else rl.get("task_args", {})
        task = make_task(name, seed=args.seed, **task_args)
        tokenizer = run_tokenizer(args.workdir)
    except (CheckpointError, ValueError, TypeError, OSError) as e:
        sys.exit(f"error: {e}")
    problems = [task.train_problem(args.first_problem + i) for i in range(args.problems)]
    start = time.time()
    examples, counts = rejection_sample(
        cfg, params, tokenizer, task, problems, args.n, key=jax.random.key(args.seed),
        max_prompt_tokens=rl.get("max_prompt_tokens", 128),
        max_new_tokens=args.max_new_tokens or rl.get("max_new_tokens", 64), temperature=args.temperature,
        top_p=args.top_p, stop=rl.get("stop", ["</answer>"]))
    write_jsonl(examples, args.out)
    print(f"step {step} of {args.workdir}: kept {counts['kept']} of {counts['sampled']} samples; "
          f"{counts['prompts_solved']}/{len(problems)} problems solved at least once; wrote {args.out} "
          f"in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
