"""A run is one stage (pretrain, sft, dsa_* or grpo), or a chain of stages, each in its own subfolder of the workdir.

This module sits above both loops: `train.loop` knows language-model steps, `rl.trainer` GRPO's, and neither
imports the other or this.

A chain config lists its stages in `chain` (e.g. ("base", "grpo")) and holds each stage's full config under that
name. A stage without `init_from` starts from the previous stage's workdir; an `init_from` that names an earlier
stage of the chain starts from that one's. A stage whose checkpoint already
reached its `steps` is skipped, so rerunning the command resumes whichever stage was running.
"""

from __future__ import annotations

import json
import os

import ml_collections

from deepseek_jax.checkpoint import Checkpointer
from deepseek_jax.metrics import read_metrics
from deepseek_jax.rl.trainer import train_grpo
from deepseek_jax.train.loop import train_lm


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Run (or resume) the config in `workdir`; returns the metrics of the last stage."""
    workdir = os.path.abspath(workdir)
    if not config.get("chain"):
        return run_stage(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=1, default=str)
    metrics, previous = [], ""
    for name in config.chain:
        stage = config[name].copy_and_resolve_references()  # an unlocked copy
        if stage.init_from in config.chain:
            stage.init_from = os.path.join(workdir, stage.init_from)
        elif not stage.init_from and previous:
            stage.init_from = previous
        stage_dir = previous = os.path.join(workdir, name)
        if finished(stage_dir, stage.steps):
            print(f"stage {name}: done ({stage.steps} steps in {stage_dir})")
            metrics = read_metrics(stage_dir)
            continue
        print(f"stage {name} ({stage.stage}) in {stage_dir}")
        metrics = run_stage(stage, stage_dir)
    return metrics


def run_stage(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    return (train_grpo if config.stage == "grpo" else train_lm)(config, workdir)


def finished(workdir: str, steps: int) -> bool:
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return False
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.latest_step() == steps
    finally:
        ckpt.close()
