"""The language-model training loop: pretraining (packed documents) and SFT (prompt/response rows, loss on the
response), one jitted step per batch, with checkpoints, exact resume, metrics and periodic eval."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from deepseek_jax import sharding
from deepseek_jax.checkpoint import Checkpointer, CheckpointError, sigterm_flag
from deepseek_jax.data import make_iterator
from deepseek_jax.data.sft import make_sft_iterator
from deepseek_jax.metrics import MetricsWriter, flops_per_token, mfu, peak_flops, read_metrics
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.start import initial_params, prepare
from deepseek_jax.train.step import (
    abstract_state,
    check_batch,
    eval_step,
    init_state,
    make_train_step,
    shardings_of,
    stage_model,
    stage_trainable,
)


def train_lm(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Pretrain (stage "pretrain") or fine-tune (stage "sft") in `workdir`, resuming from its latest checkpoint;
    returns the metrics logged in this workdir."""
    workdir = os.path.abspath(workdir)
    cfg, tokenizer = prepare(config, workdir)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    rules = check_batch(config, mesh)
    iterator = functools.partial(make_sft_iterator, chat=config.sft.chat) if config.stage == "sft" else make_iterator
    data = functools.partial(iterator, config.data.source, tokenizer, seq_len=config.data.seq_len,
                             global_batch_size=config.data.batch_size, seed=config.seed,
                             process_index=jax.process_index(), process_count=jax.process_count())
    train_data = data(split="train")

    tx, schedule = make_optimizer(config.optim, config.steps, trainable=stage_trainable(config))
    batch_sh = sharding.batch_sharding(mesh, rules)
    step_fn = make_train_step(config, cfg, tx, schedule)
    flops, (peak, _) = flops_per_token(cfg, config.data.seq_len), peak_flops()
    abstract = abstract_state(cfg, tx, mesh, offload=config.optim.offload)
    state_sh = shardings_of(abstract)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        @functools.partial(jax.jit, out_shardings=state_sh)
        def init(key):  # params and optimizer state are created directly in their shardings
            return init_state(nn.meta.unbox(DeepSeekV3(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]), tx)

        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
        writer = MetricsWriter(workdir)
        start = ckpt.latest_step()
        if start is None:
            logged = [m for m in read_metrics(workdir) if m["step"] > 0]  # a step-0 eval may precede any save
            if logged:
                raise CheckpointError(f"{workdir} holds metrics up to step {logged[-1]['step']} but no checkpoint "
                                      "to resume from; use a fresh --workdir")
            state = init(jax.random.key(config.seed))
            if config.init_from:
                state = state.replace(params=initial_params(config.init_from, state.params))
            start = 0
        else:
            start, state, data_state = ckpt.restore(abstract)
            train_data.set_state(data_state)
            print(f"resumed from step {start} in {workdir}", file=sys.stderr)
        writer.truncate_after(start - 1 if start == 0 else start)
        step_jit = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_sh, None))
        eval_jit = jax.jit(functools.partial(eval_step, cfg=stage_model(config, cfg)))
        if start == 0 and config.stage == "dsa_warmup":  # the fresh indexer, before any step: step 0
            writer.write(0, evaluate(eval_jit, state.params, data(split="eval"), config.eval_batches, batch_sh))

        with sigterm_flag() as stop:
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
                            metrics |= evaluate(eval_jit, state.params, data(split="eval"), config.eval_batches,
                                                batch_sh)
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
                ckpt.close()
                writer.close()
    return read_metrics(workdir)


def evaluate(eval_jit, params: Any, iterator, n_batches: int, batch_sh) -> dict[str, float]:
    """eval_loss: the mean next-token CE over the first n_batches of the held-out split; with DSA also
    eval_indexer_kl and eval_indexer_mass (means over the batches)."""
    total, count, dsa = 0.0, 0.0, {}
    for _, batch in zip(range(n_batches), iterator, strict=False):
        out = jax.device_get(eval_jit(params, jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(batch_sh, x), batch)))
        total, count = total + float(out.pop("ce_sum")), count + float(out.pop("count"))
        for k, v in out.items():
            dsa.setdefault(f"eval_{k}", []).append(float(v))
    return {"eval_loss": total / max(count, 1.0)} | {k: sum(v) / len(v) for k, v in dsa.items()}
