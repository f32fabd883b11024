"""GRPO training (DeepSeekMath sec. 4.1; R1-Zero): rollout, score, then `mu` jitted updates per rollout batch.

Each step samples P problems of the task, G completions each through the inference engine (temperature 1,
stopping at `</answer>` or EOS), scores them with the task's rule-based rewards, standardizes the rewards within
each group, computes old-policy and reference log-probs in one jitted pass (recording the MoE routes), and runs
`mu` optimizer steps on the GRPO loss, replaying those routes when `routing_replay` is on. The reference model is
frozen, optionally refreshed to the policy every `ref_refresh_every` steps (R1: every 400). Checkpoints, metrics
(metrics.jsonl + TensorBoard) and the mesh are the pretraining machinery's; the problems and the sampling key
of step s depend only on s and the seed, so a killed run resumes exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from deepseek_jax import sharding
from deepseek_jax.checkpoint import Checkpointer, CheckpointError, sigterm_flag
from deepseek_jax.config import ModelConfig
from deepseek_jax.metrics import MetricsWriter, read_metrics
from deepseek_jax.rl.grpo import grpo_loss, informative_groups
from deepseek_jax.rl.rollout import Rollout, collect, keep_informative, sample, score, token_logprobs
from deepseek_jax.train.optimizer import make_optimizer


class GRPOState(flax.struct.PyTreeNode):
    step: jax.Array  # rollout steps done
    params: Any
    opt_state: Any
    ref_params: Any  # the frozen reference policy (None when beta == 0)


def update(state: GRPOState, batch: dict, *, cfg: ModelConfig, tx: optax.GradientTransformation,
           epsilon: float, beta: float, loss_type: str, epsilon_high: float | None = None) -> tuple[GRPOState, dict]:
    """One optimizer step on the GRPO loss (DeepSeekMath eq. 3) of a scored rollout batch."""
    def loss_fn(params):
        logprobs, _, _ = token_logprobs(cfg, params, batch["tokens"], routes=batch.get("routes"))
        return grpo_loss(logprobs, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
                         batch["mask"], epsilon=epsilon, beta=beta, loss_type=loss_type,
                         epsilon_high=epsilon_high)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = metrics | {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), metrics


def train_grpo(config: Any, workdir: str) -> list[dict]:
    """Stage "grpo" of launch.train: the policy from init_from (a training run or a HF directory, with its
    tokenizer and chat template; a random init if unset), the task from rl.task and rl.task_args."""
    from deepseek_jax.model import init_params
    from deepseek_jax.rl.curriculum import Curriculum
    from deepseek_jax.train.start import initial_params, prepare

    workdir = os.path.abspath(workdir)
    cfg, tokenizer = prepare(config, workdir)
    levels = config.rl.get("curriculum", {})
    curriculum = Curriculum(config.rl.task, config.seed, config.rl.task_args.to_dict(),
                            **(levels.to_dict() if levels else {}))
    if config.init_from:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                      nn.meta.unbox(_boxed(cfg)))
        params = initial_params(config.init_from, like)
    else:
        params = init_params(cfg, jax.random.key(config.seed))
    return run_grpo(cfg, params, tokenizer, curriculum.task, config, workdir, curriculum=curriculum)


def run_grpo(cfg: ModelConfig, params: Any, tokenizer: Any, task: Any, config: Any, workdir: str,
             curriculum: Any = None) -> list[dict]:
    """GRPO on `task` from `params`; config: steps, seed, log_every, checkpoint_every, keep_checkpoints, optim.*,
    rl.*. With a `curriculum` (rl.curriculum.Curriculum) the train problems come from its current level, and the
    eval set stays `task`'s. SIGTERM ends the run after the current step, with a checkpoint. Returns the logged
    metrics."""
    rl = config.rl
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    group, per_step = rl.group_size, rl.prompts_per_step
    replay = bool(rl.routing_replay) and bool(cfg.n_routed_experts)
    mesh = sharding.make_mesh(config.mesh.to_dict())
    tx, schedule = make_optimizer(config.optim, config.steps * rl.mu)
    stop = list(rl.stop)
    weights = dict(rl.reward_weights)
    eval_set = task.eval_problems()[:rl.eval_problems]

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        params = jax.device_put(params, sharding.logical_shardings(mesh, _boxed(cfg)))
        state = jax.jit(lambda p: GRPOState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                            ref_params=p if rl.beta else None))(params)  # each leaf its own buffer
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
        writer = MetricsWriter(workdir)
        start = ckpt.latest_step()
        if start is None:
            if read_metrics(workdir):
                raise CheckpointError(f"{workdir} holds metrics but no checkpoint to resume from; use a fresh "
                                      "--workdir")
            start = 0
        else:
            start, state, data = ckpt.restore(jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
            if curriculum is not None:
                curriculum.load(data)
            print(f"resumed GRPO from step {start} in {workdir}", file=sys.stderr)
        writer.truncate_after(start)
        score_jit = jax.jit(functools.partial(score, cfg, replay=replay))
        update_jit = jax.jit(functools.partial(update, cfg=cfg, tx=tx, epsilon=rl.epsilon,
                                               epsilon_high=rl.get("epsilon_high", rl.epsilon), beta=rl.beta,
                                               loss_type=rl.loss_type), donate_argnums=0)
        key = jax.random.key(config.seed)
        rounds = 1 + rl.get("dynamic_sampling", 0)
        stream = curriculum or task

        def rollouts(step: int) -> tuple[Rollout, list, dict[str, float]]:
            """The step's rollout batch: per_step problems, G samples each. With dynamic sampling, groups whose
            rewards are all equal are replaced by groups of more problems, up to `rounds` rollouts of per_step
            (round r of step s draws train problems ((s-1) rounds + r) per_step + i: resume stays exact)."""
            drawn, problems = [], []
            for r in range(rounds):
                batch = [stream.train_problem(((step - 1) * rounds + r) * per_step + i) for i in range(per_step)]
                drawn.append(collect(cfg, state.params, tokenizer, task, batch, group_size=group,
                                     max_prompt_tokens=rl.max_prompt_tokens, max_new_tokens=rl.max_new_tokens,
                                     temperature=rl.temperature, top_p=rl.top_p,
                                     key=jax.random.fold_in(jax.random.fold_in(key, step), r), reward_weights=weights,
                                     stop=stop, chat=rl.chat, overlong_buffer=rl.get("overlong_buffer", 0)))
                problems += batch
                if sum(informative_groups(d.rewards, group).sum() for d in drawn) >= per_step:
                    break
            rollout, order = keep_informative(drawn, group, per_step) if rounds > 1 else (drawn[0], range(per_step))
            share = float(informative_groups(drawn[0].rewards, group).mean())
            useful = float(informative_groups(rollout.rewards, group).mean())
            return rollout, [problems[i] for i in order], {
                "groups_kept": share, "groups_informative": useful, "rollout_rounds": float(len(drawn)),
                "sampled_accuracy": float(drawn[0].components.get("accuracy", drawn[0].rewards).mean())}

        with sigterm_flag() as signaled:
            bar = tqdm(total=config.steps, initial=start, desc="grpo", dynamic_ncols=True, file=sys.stderr,
                       disable=jax.process_index() != 0)
            try:
                for step in range(start + 1, config.steps + 1):
                    t0 = time.time()
                    rollout, problems, kept = rollouts(step)
                    sampled_accuracy = kept.pop("sampled_accuracy")
                    if curriculum is not None:
                        kept |= curriculum.state()  # the level this step's problems came from
                        curriculum.observe(sampled_accuracy)
                    batch = scored_batch(score_jit, state, rollout)
                    entropy = _masked_mean(batch.pop("entropy"), rollout.mask)
                    for _ in range(rl.mu):
                        state, metrics = update_jit(state, batch)
                    state = state.replace(step=state.step + 1)
                    if state.ref_params is not None and rl.ref_refresh_every and step % rl.ref_refresh_every == 0:
                        state = state.replace(ref_params=jax.tree_util.tree_map(jnp.copy, state.params))
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(metrics["loss"]):
                        raise FloatingPointError(f"GRPO loss is {metrics['loss']} at step {step}; lower optim.lr")
                    metrics |= rollout_metrics(rollout) | kept | {"entropy": entropy, "step_time_s": time.time() - t0,
                                                           "lr": float(schedule(step * rl.mu - 1))}
                    if rl.eval_every and (step % rl.eval_every == 0 or step == config.steps):
                        metrics["eval_accuracy"] = evaluate(cfg, state.params, tokenizer, task, eval_set, rl)
                    if step % config.log_every == 0 or step == config.steps or "eval_accuracy" in metrics:
                        writer.write(step, metrics)
                        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}")
                    if rl.samples_every and step % rl.samples_every == 0:
                        write_samples(workdir, step, problems, rollout, group)
                    bar.update(1)
                    stopping = bool(signaled["signal"])
                    if stopping or step % config.checkpoint_every == 0 or step == config.steps:
                        ckpt.save(step, state, {"step": step, **(curriculum.state() if curriculum else {})},
                                  wait=stopping)
                    if signaled["signal"]:
                        print(f"signal {signaled['signal']}: saved step {step}, exiting", file=sys.stderr)
                    if stopping:
                        break
            finally:
                bar.close()
                ckpt.close()
                writer.close()
    return read_metrics(workdir)


def _boxed(cfg: ModelConfig) -> Any:
    from deepseek_jax.model import abstract_params

    return abstract_params(cfg)


def scored_batch(score_jit: Any, state: GRPOState, rollout: Rollout) -> dict[str, Any]:
    """Device arrays for the update: tokens, mask, advantages, and the scoring pass's log-probs and routes."""
    tokens = jnp.asarray(rollout.tokens)
    scored = score_jit(state.params, state.ref_params, tokens)
    batch = {"tokens": tokens, "mask": jnp.asarray(rollout.mask), "advantages": jnp.asarray(rollout.advantages),
             "old_logprobs": scored["old_logprobs"], "ref_logprobs": scored["ref_logprobs"],
             "entropy": scored["entropy"]}
    if scored["routes"] is not None:
        batch["routes"] = scored["routes"]
    return batch


def _masked_mean(x: jax.Array, mask: np.ndarray) -> float:
    return float(jnp.sum(x * mask) / max(float(mask.sum()), 1.0))


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """reward (mean of the weighted sum), each reward component, and the mean response length in tokens."""
    out = {"reward": float(rollout.rewards.mean()), "reward_std": float(rollout.rewards.std()),
           "response_length": float(rollout.lengths.mean())}
    return out | {name: float(v.mean()) for name, v in rollout.components.items()}


def evaluate(cfg: ModelConfig, params: Any, tokenizer: Any, task: Any, problems: list, rl: Any) -> float:
    """Greedy accuracy on held-out problems (one compiled batch)."""
    _, _, texts = sample(cfg, params, tokenizer, [p.prompt for p in problems], max_prompt_tokens=rl.max_prompt_tokens,
                         max_new_tokens=rl.max_new_tokens, stop=list(rl.stop), chat=rl.chat)
    return float(np.mean([task.score(p, t)["accuracy"] for p, t in zip(problems, texts, strict=True)]))


def write_samples(workdir: str, step: int, problems: list, rollout: Rollout, group: int) -> None:
    """Append one JSON line per sampled completion to workdir/samples.jsonl, for reading what the model thinks."""
    with open(os.path.join(workdir, "samples.jsonl"), "a", encoding="utf-8") as f:
        for row, text in enumerate(rollout.completions):
            f.write(json.dumps({"step": step, "prompt": problems[row // group].prompt, "completion": text,
                                "reward": float(rollout.rewards[row]),
                                **{k: float(v[row]) for k, v in rollout.components.items()}},
                               ensure_ascii=False) + "\n")
