"""Train a DeepSeek-V3-style model: pretraining, SFT or GRPO (config.stage), or a chain of stages.

  python -m launch.train [--config=configs/tiny.py] [--workdir=DIR] [--config.steps=1000 ...]
  python -m launch.train --config=configs/countdown_r1zero.py --workdir=DIR      # base model, then GRPO

Rerunning the same command on the same workdir resumes from its latest checkpoint (in a chain, whichever stage was
running); the data order continues exactly. SIGTERM saves a checkpoint and exits.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from configs import DEFAULT_CONFIG
from deepseek_jax import sharding
from deepseek_jax.checkpoint import CheckpointError
from deepseek_jax.config import ConfigError
from deepseek_jax.data import DataError
from deepseek_jax.stages import run as train

__all__ = ["train"]


def default_workdir(config: ml_collections.ConfigDict) -> str:
    name = "-".join(config.chain) if config.get("chain") else config.stage
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{name}")


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a program, so importing this module defines nothing)."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "ml-collections config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (default: a fresh folder under runs/)")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0, for multi-process runs without TPU/SLURM auto-detection")
    flags.DEFINE_integer("num_processes", None, "processes in the run (with --coordinator_address)")
    flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")


def init_distributed() -> None:
    """jax.distributed.initialize: explicit from the flags, automatic on TPU pods and under SLURM."""
    if FLAGS.coordinator_address:
        if FLAGS.num_processes is None or FLAGS.process_id is None:
            sys.exit("error: --coordinator_address needs --num_processes and --process_id")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over gloo
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    init_distributed()
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config)
    if jax.process_index() == 0:
        print(f"workdir: {os.path.abspath(workdir)}", file=sys.stderr)
    try:
        metrics = train(config, workdir)
    except (ConfigError, CheckpointError, DataError, sharding.MeshError, FloatingPointError, ValueError) as e:
        sys.exit(f"error: {e}")
    if metrics and jax.process_index() == 0:
        first, last = metrics[0], metrics[-1]
        key = "loss" if "reward" not in last else "reward"
        print(f"done: step {last['step']}, {key} {first[key]:.3f} -> {last[key]:.3f}"
              + (f", eval accuracy {last['eval_accuracy']:.3f}" if "eval_accuracy" in last else ""))


if __name__ == "__main__":
    define_flags()
    app.run(main)
