"""A run is one stage (pretrain, sft, dsa_* or grpo), or a chain of stages, each in its own subfolder of the workdir.

This module sits above both loops: `train.loop` knows language-model steps, `rl.trainer` GRPO's, and neither
imports the other or this.

A chain config lists its stages in `chain` (e.g. ("base", "grpo")) and holds each stage's full config under that
name. A stage without `init_from` starts from the previous stage's workdir; an `init_from` that names an earlier
stage of the chain starts from that one's. A stage whose checkpoint already
reached its `steps` is skipped, so rerunning the command resumes whichever stage was running.

An SFT stage of a chain may write its own examples first (into its workdir's examples.jsonl, its data.source):
sft.make = "coldstart" writes R1's cold-start data (rl.coldstart: a program's written search) for the first
sft.examples problems of the `evaluate` stage's task; sft.make = "rejection" samples sft.samples completions of
as many problems from the stage sft.sample_from (default: the one it starts from) and keeps those whose rewards
named in sft.keep_on (default: all) are 1 (R1 sec. 2.3.3, which samples the RL model and fine-tunes the base).

A chain with `evaluate` (the name of one of its GRPO stages) scores every stage's final model on that stage's
held-out problems (greedy, rl.eval_problems of them) and keeps the table in workdir/accuracy.json. Every run
with GRPO stages draws their curves into workdir/curves.png (rl.curves.plot_curves).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from deepseek_jax.checkpoint import Checkpointer, load_run
from deepseek_jax.data import run_tokenizer
from deepseek_jax.metrics import read_metrics
from deepseek_jax.rl.coldstart import coldstart_examples
from deepseek_jax.rl.curves import plot_curves
from deepseek_jax.rl.rejection import rejection_sample, write_jsonl
from deepseek_jax.rl.tasks import make_task
from deepseek_jax.rl.trainer import evaluate, train_grpo
from deepseek_jax.train.loop import train_lm


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Run (or resume) the config in `workdir`; returns the metrics of the last stage."""
    workdir = os.path.abspath(workdir)
    if not config.get("chain"):
        metrics = run_stage(config, workdir)
        if config.stage == "grpo":
            plot_curves([("grpo", metrics)], os.path.join(workdir, "curves.png"))
        return metrics
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=1, default=str)
    judge = config[config.evaluate] if config.get("evaluate") else None
    accuracy_path = os.path.join(workdir, "accuracy.json")
    accuracy = _read_json(accuracy_path) if judge else {}
    metrics, previous, curves = [], "", []
    for name in config.chain:
        stage = config[name].copy_and_resolve_references()  # an unlocked copy
        if stage.init_from in config.chain:
            stage.init_from = os.path.join(workdir, stage.init_from)
        elif not stage.init_from and previous:
            stage.init_from = previous
        stage_dir = os.path.join(workdir, name)
        if stage.stage == "sft" and stage.sft.get("make") and not finished(stage_dir, stage.steps):
            if judge is None:
                raise ValueError(f"stage {name}: sft.make={stage.sft.make!r} needs the chain's `evaluate` stage "
                                 "for its task")
            source = os.path.join(workdir, stage.sft.sample_from) if stage.sft.get("sample_from") else stage.init_from
            stage.data.source = sft_examples(stage, judge, stage_dir, source)
        previous = stage_dir
        if finished(stage_dir, stage.steps):
            print(f"stage {name}: done ({stage.steps} steps in {stage_dir})")
            metrics = read_metrics(stage_dir)
        else:
            print(f"stage {name} ({stage.stage}) in {stage_dir}")
            metrics = run_stage(stage, stage_dir)
        if stage.stage == "grpo":
            curves.append((name, metrics))
        if judge is not None and name not in accuracy:
            accuracy[name] = stage_accuracy(stage_dir, judge)
            with open(accuracy_path, "w") as f:
                json.dump(accuracy, f, indent=1)
        if judge is not None:
            print(f"stage {name}: held-out accuracy {accuracy[name]:.3f}")
    if curves:
        first = list(config.chain).index(curves[0][0])
        before = accuracy.get(config.chain[first - 1]) if first else None
        plot_curves(curves, os.path.join(workdir, "curves.png"), start_accuracy=before)
    return metrics


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    return (train_grpo if config.stage == "grpo" else train_lm)(config, workdir)


def sft_examples(stage: ml_collections.ConfigDict, judge: ml_collections.ConfigDict, stage_dir: str,
                 source: str) -> str:
    """Write (once) the examples of an SFT stage with sft.make, on problems of `judge`'s task, rejection-sampled
    from the run in `source`; returns the path."""
    path = os.path.join(stage_dir, "examples.jsonl")
    if os.path.exists(path):
        return path
    task = make_task(judge.rl.task, seed=judge.seed, **judge.rl.task_args.to_dict())
    if stage.sft.make == "coldstart":
        examples = coldstart_examples(task, stage.sft.examples, seed=stage.seed)
    elif stage.sft.make == "rejection":
        cfg, params, _ = load_run(source)
        first = 1_000_000  # far past the problems the GRPO stages drew
        problems = [task.train_problem(first + i) for i in range(stage.sft.examples)]
        examples, counts = rejection_sample(
            cfg, params, run_tokenizer(source), task, problems, stage.sft.samples,
            key=jax.random.key(stage.seed), max_prompt_tokens=judge.rl.max_prompt_tokens,
            max_new_tokens=judge.rl.max_new_tokens, temperature=judge.rl.temperature, stop=list(judge.rl.stop),
            keep_on=tuple(stage.sft.get("keep_on", ())) or None)
        print(f"rejection sampling from {source}: kept {counts['kept']} of {counts['sampled']} samples "
              f"({counts['solve_rate']:.1%} of the problems solved)")
        if not examples:
            raise ValueError(f"rejection sampling from {source} kept none of {counts['sampled']} samples: raise "
                             "sft.examples or sft.samples, or train the stage it samples longer")
    else:
        raise ValueError(f"sft.make must be 'coldstart' or 'rejection', got {stage.sft.make!r}")
    write_jsonl(examples, path)
    return path


def stage_accuracy(stage_dir: str, judge: ml_collections.ConfigDict) -> float:
    """Greedy accuracy of a stage's final model on the held-out problems of GRPO config `judge`."""
    cfg, params, _ = load_run(stage_dir)
    task = make_task(judge.rl.task, seed=judge.seed, **judge.rl.task_args.to_dict())
    problems = task.eval_problems()[:judge.rl.eval_problems]
    return evaluate(cfg, params, run_tokenizer(stage_dir), task, problems, judge.rl)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def finished(workdir: str, steps: int) -> bool:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return False
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.latest_step() == steps
    finally:
        ckpt.close()
