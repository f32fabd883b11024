"""Pretrain a DeepSeek-V3-style model.

  python -m launch.train [--config=configs/tiny.py] [--workdir=DIR] [--config.steps=1000 ...]

Rerunning the same command on the same workdir resumes from its latest checkpoint; the data
order continues exactly. SIGTERM saves a checkpoint and exits.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from configs import DEFAULT_CONFIG, validate
from deepseek_jax import sharding
from deepseek_jax.checkpoint import Checkpointer, CheckpointError, abstract_like, is_run, restore_params
from deepseek_jax.config import ConfigError
from deepseek_jax.data import load_or_train_tokenizer, make_iterator
from deepseek_jax.metrics import MetricsWriter, flops_per_token, mfu, peak_flops, read_metrics
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import abstract_state, eval_step, init_state, shardings_of, train_step


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Run (or resume) training in `workdir`; returns the metrics logged in this workdir."""
    cfg = validate(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=str)

    mesh = sharding.make_mesh(config.mesh.to_dict())
    tokenizer = load_or_train_tokenizer(config.data.tokenizer or None, cfg.vocab_size)
    if jax.process_index() == 0:  # the run carries its tokenizer, for launch.generate
        tokenizer.save(os.path.join(workdir, "tokenizer.model"))
    data = functools.partial(make_iterator, config.data.source, tokenizer, seq_len=config.data.seq_len,
                             global_batch_size=config.data.batch_size, seed=config.seed,
                             process_index=jax.process_index(), process_count=jax.process_count())
    train_data = data(split="train")

    tx, schedule = make_optimizer(config.optim, config.steps)
    batch_sh = sharding.batch_sharding(mesh)
    step_fn = functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule, mtp_lambda=config.mtp_lambda,
                                bias_update_speed=config.bias_update_speed, grad_accum=config.grad_accum)
    flops, (peak, _) = flops_per_token(cfg, config.data.seq_len), peak_flops()
    abstract = abstract_state(cfg, tx, mesh)
    state_sh = shardings_of(abstract)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        @functools.partial(jax.jit, out_shardings=state_sh)
        def init(key):  # params and optimizer state are created directly in their shardings
            return init_state(nn.meta.unbox(DeepSeekV3(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]), tx)

        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
        writer = MetricsWriter(workdir)
        start = ckpt.latest_step()
        if start is None:
            logged = read_metrics(workdir)
            if logged:
                raise CheckpointError(f"{workdir} holds metrics up to step {logged[-1]['step']} but no checkpoint "
                                      "to resume from; use a fresh --workdir")
            state = init(jax.random.key(config.seed))
            if config.init_from:
                state = state.replace(params=load_params(config.init_from, state.params))
            start = 0
        else:
            start, state, data_state = ckpt.restore(abstract)
            train_data.set_state(data_state)
            print(f"resumed from step {start} in {workdir}", file=sys.stderr)
        writer.truncate_after(start)
        step_jit = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_sh, None))
        eval_jit = jax.jit(functools.partial(eval_step, cfg=cfg))

        stop = {"signal": None}
        previous = signal.signal(signal.SIGTERM, lambda sig, _: stop.update(signal=sig))
        tokens_per_step = config.data.batch_size * config.data.seq_len
        last_good, t0, t0_step = start, time.time(), start
        bar = tqdm(total=config.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr,
                   disable=jax.process_index() != 0)
        try:
            for step in range(start + 1, config.steps + 1):
                batch = jax.tree_util.tree_map(
                    lambda x: jax.make_array_from_process_local_data(batch_sh, x), next(train_data))
                state, metrics = step_jit(state, batch)
                bar.update(1)
                log = step % config.log_every == 0 or step == config.steps
                save = step % config.checkpoint_every == 0 or step == config.steps or stop["signal"]
                if log or save:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(metrics["loss"]):
                        raise FloatingPointError(
                            f"loss is {metrics['loss']} at step {step}; stopping. The last good checkpoint "
                            f"(step {last_good}) in {ckpt.directory} is kept. Lower optim.lr or check the data.")
                if log:
                    elapsed = time.time() - t0
                    tps = tokens_per_step * (step - t0_step) / max(elapsed, 1e-9)
                    metrics |= {"tokens_per_s": tps, "mfu": mfu(tps, flops, jax.device_count(), peak),
                                "step_time_s": elapsed / (step - t0_step)}
                    if step % config.eval_every == 0 or step == config.steps:
                        metrics["eval_loss"] = evaluate(eval_jit, state.params, data(split="eval"),
                                                        config.eval_batches, batch_sh)
                    writer.write(step, metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    t0, t0_step = time.time(), step
                if save:
                    ckpt.save(step, state, train_data.get_state(), wait=bool(stop["signal"]))
                    last_good = step
                if stop["signal"]:
                    print(f"signal {stop['signal']}: saved step {step}, exiting", file=sys.stderr)
                    break
        finally:
            bar.close()
            ckpt.wait()
            ckpt.close()
            writer.close()
            signal.signal(signal.SIGTERM, previous)
    return read_metrics(workdir)


def evaluate(eval_jit, params: Any, iterator, n_batches: int, batch_sh) -> float:
    """Mean next-token CE over the first n_batches of the held-out split."""
    total, count = 0.0, 0.0
    for _, batch in zip(range(n_batches), iterator, strict=False):
        out = eval_jit(params, jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(batch_sh, x), batch))
        total, count = total + float(out["ce_sum"]), count + float(out["count"])
    return total / max(count, 1.0)


def load_params(path: str, like: Any) -> Any:
    """Params from a training workdir (its latest checkpoint) or an orbax params directory."""
    path = os.path.abspath(path)
    if is_run(path):
        return restore_params(os.path.join(path, "checkpoints"), like)[1]
    params_dir = os.path.join(path, "params") if os.path.isdir(os.path.join(path, "params")) else path
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"init_from={path} does not exist")
    return ocp.StandardCheckpointer().restore(params_dir, abstract_like(like))


def default_workdir(config: ml_collections.ConfigDict) -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{config.stage}")


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
    except (ConfigError, CheckpointError, sharding.MeshError, FloatingPointError, ValueError) as e:
        sys.exit(f"error: {e}")
    if metrics and jax.process_index() == 0:
        first, last = metrics[0], metrics[-1]
        print(f"done: step {last['step']}, loss {first['loss']:.3f} -> {last['loss']:.3f}; "
              f"metrics in {os.path.join(os.path.abspath(workdir), 'metrics.jsonl')}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
