"""GRPO training: the reward rises on a learnable task, resume is exact, MoE routes replay; SFT masks the prompt;
rejection sampling keeps only rewarded samples; the countdown chain runs end to end through launch.train."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from rl_toys import CharTokenizer, DigitTask

import deepseek_jax as dsj
from configs import countdown_r1, countdown_r1zero, tiny
from deepseek_jax.data.sft import make_sft_iterator
from deepseek_jax.metrics import read_metrics
from deepseek_jax.rl.rejection import rejection_sample
from deepseek_jax.rl.rollout import cut_at_stop, layout, token_logprobs
from deepseek_jax.rl.tasks import full_response, make_task
from deepseek_jax.rl.trainer import run_grpo
from deepseek_jax.train.losses import cross_entropy_sum
from deepseek_jax.train.step import loss_terms
from launch.train import train

TIMING = ("step_time_s",)


def digit_setup(steps, **rl):
    tok = CharTokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size, num_nextn_predict_layers=0)
    config = tiny.get_config()
    config.steps, config.log_every, config.checkpoint_every = steps, 1, 100
    config.optim.update(lr=2e-3, warmup_steps=0, decay_start=1.0)
    config.rl.update(group_size=16, prompts_per_step=4, max_prompt_tokens=4, max_new_tokens=1, stop=(), beta=0.0,
                     eval_every=steps, eval_problems=10, samples_every=0)
    config.rl.update(rl)
    config.rl.reward_weights = {"accuracy": 1.0}
    return cfg, dsj.init_params(cfg, jax.random.key(0)), tok, config


def test_grpo_raises_the_reward(tmp_path):
    """"Answer with the digit shown" from a random init: 1 in 36 at first, most of the time after 60 steps."""
    cfg, params, tok, config = digit_setup(60)
    metrics = run_grpo(cfg, params, tok, DigitTask(), config, str(tmp_path))
    rewards = [m["reward"] for m in metrics]
    assert np.mean(rewards[:10]) < 0.15 and np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.25, rewards
    assert metrics[-1]["eval_accuracy"] >= 0.5
    for key in ("reward", "accuracy", "kl", "clip_fraction", "entropy", "response_length", "loss", "grad_norm"):
        assert np.isfinite(metrics[-1][key]), key


def test_grpo_resume_is_exact(tmp_path):
    """SIGTERM during step 2 (a preemption) ends the run after that step with a checkpoint; restarted, it logs what
    an uninterrupted one logs (KL to a reference, MoE routes replayed, mu = 2 updates per rollout)."""
    cfg, params, tok, config = digit_setup(4, beta=0.04, mu=2)
    straight = run_grpo(cfg, params, tok, DigitTask(), config, str(tmp_path / "a"))

    class Preempted(DigitTask):
        def train_problem(self, i):
            if i == config.rl.prompts_per_step:  # the first problem of step 2
                os.kill(os.getpid(), signal.SIGTERM)
            return super().train_problem(i)

    stopped = run_grpo(cfg, params, tok, Preempted(), config, str(tmp_path / "b"))
    assert [m["step"] for m in stopped] == [1, 2]
    resumed = run_grpo(cfg, params, tok, DigitTask(), config, str(tmp_path / "b"))
    strip = [{k: v for k, v in m.items() if k not in TIMING} for m in straight]
    assert [{k: v for k, v in m.items() if k not in TIMING} for m in resumed] == strip
    assert straight[-1]["kl"] > 0


def test_routing_replay():
    """Replaying a pass's own routes changes nothing; replaying other routes changes the experts used, and the
    gate weights still get gradients."""
    cfg = tiny_config()
    params = dsj.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    logp, _, routes = token_logprobs(cfg, params, tokens, record=True)
    idx = routes["layers_1"]["mlp"]["router"]["idx"]
    assert idx.shape == (2, 2, 9, cfg.num_experts_per_tok)
    np.testing.assert_array_equal(token_logprobs(cfg, params, tokens, routes=routes)[0], logp)
    other = jax.tree_util.tree_map(lambda r: (r + 1) % cfg.n_routed_experts, routes)
    assert float(jnp.abs(token_logprobs(cfg, params, tokens, routes=other)[0] - logp).max()) > 1e-4

    def loss(p):
        return token_logprobs(cfg, p, tokens, routes=other)[0].sum()

    gate = jax.grad(loss)(params)["layers_1"]["mlp"]["router"]["gate"]["kernel"]
    assert float(jnp.abs(gate).max()) > 0


def test_layout_masks_exactly_the_completion_targets():
    tokens, mask = layout([[5, 6, 7], [8]], np.array([[1, 2, 0], [3, 4, 9]]), np.array([2, 3]), 7, 0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 1, 2, 0, 0], [8, 3, 4, 9, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])  # t predicts token t+1


def test_completions_end_at_the_first_stop_string():
    """However the stop string was tokenized inside the text, the completion ends right after it."""
    tok = CharTokenizer()
    ids = np.asarray(tok.encode("12 </answer> 34 </answer>"))
    assert tok.decode(ids[:cut_at_stop(tok, ids, ["</answer>"])]) == "12 </answer>"
    assert cut_at_stop(tok, ids, ["</think>"]) == len(ids)


def test_sft_loss_covers_only_the_response(tmp_path):
    tok = CharTokenizer()
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"q{i}:", "response": f"a{i % 10}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with pytest.warns(UserWarning, match="skipped 1 lines"):
        it = make_sft_iterator(str(path), tok, seq_len=8, global_batch_size=4, seed=0)
    batch = next(it)
    for row in range(4):
        n = int(batch["segment_ids"][row].sum())
        text = tok.decode(batch["tokens"][row, :n])
        prompt_len = text.index(":") + 1
        want = np.zeros(8, np.int32)
        want[prompt_len:n] = 1  # the response characters and the EOS
        np.testing.assert_array_equal(batch["target_mask"][row], want)
        assert batch["tokens"][row, n - 1] == tok.eos_id
    cfg = tiny_config(vocab_size=tok.vocab_size)
    params = dsj.init_params(cfg, jax.random.key(0))
    _, aux = loss_terms(cfg, params, {k: jnp.asarray(v) for k, v in batch.items()}, 0.0, jnp.asarray(1.0))
    logits = dsj.forward(cfg, params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                         jnp.asarray(batch["segment_ids"])).logits
    targets = np.roll(batch["tokens"], -1, axis=1)
    response = np.roll(batch["target_mask"], -1, axis=1) > 0  # predicting a response token
    np.testing.assert_allclose(aux["ce"], cross_entropy_sum(logits, jnp.asarray(targets), jnp.asarray(response)),
                               rtol=1e-5)


def test_rejection_sampling_keeps_only_rewarded_samples():
    tok = CharTokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size, num_nextn_predict_layers=0)
    params = dsj.init_params(cfg, jax.random.key(0))
    task = DigitTask()
    problems = [task.train_problem(i) for i in range(12)]
    kept, counts = rejection_sample(cfg, params, tok, task, problems, 16, key=jax.random.key(0), max_prompt_tokens=4,
                                    max_new_tokens=1, threshold=1.0)
    assert counts["sampled"] == 12 * 16 and 0 < counts["kept"] < counts["sampled"]
    for ex in kept:
        assert ex["response"] == ex["prompt"][0]  # the digit itself, one token: accuracy and format both 1
    assert len({(ex["prompt"], ex["response"]) for ex in kept}) == len(kept) == counts["prompts_solved"]


def test_countdown_chain_through_launch_train(tmp_path):
    """The R1-Zero config, shrunk: a base model on synthetic arithmetic text, then GRPO on countdown; the GRPO
    stage logs rewards and samples, and a rerun skips the finished stages."""
    config = countdown_r1zero.get_config()
    small = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, intermediate_size=128, n_routed_experts=8,
                 num_experts_per_tok=2, n_group=2, topk_group=2, q_lora_rank=32, kv_lora_rank=32)
    for stage in (config.base, config.grpo):
        stage.model.update(small)
    config.base.update(steps=4, log_every=2, eval_every=4, checkpoint_every=4)
    config.base.data.update(source="synthetic:arithmetic:200", seq_len=64, batch_size=8)
    config.grpo.update(steps=2, log_every=1, checkpoint_every=2)
    config.grpo.rl.update(group_size=2, prompts_per_step=2, max_new_tokens=8, eval_every=2, eval_problems=4,
                          samples_every=1, dynamic_sampling=2, epsilon_high=0.28, overlong_buffer=4)  # + DAPO's
    config.grpo.rl.curriculum.update(arg="num_numbers", levels=(2, 3), advance_at=0.0)  # rises after step 1
    metrics = train(config, str(tmp_path))
    assert [m["step"] for m in metrics] == [1, 2]
    assert [m["curriculum_level"] for m in metrics] == [0, 1]
    samples = [json.loads(line) for line in open(tmp_path / "grpo" / "samples.jsonl")]
    assert [s["prompt"].count(",") + s["prompt"].count(" and ") for s in samples] == [1] * 4 + [2] * 4
    assert open(tmp_path / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for key in ("reward", "accuracy", "format", "kl", "clip_fraction", "entropy", "response_length", "overlong"):
        assert key in metrics[-1], key
    for m in metrics:  # rounds stop once the batch is full of groups with reward spread, or after 1 + 2 rounds
        assert 1 <= m["rollout_rounds"] <= 3 and 0 <= m["groups_kept"] <= m["groups_informative"] <= 1
        assert m["rollout_rounds"] == 3 or m["groups_informative"] == 1.0
        assert -1.0 <= m["overlong"] <= 0.0
    assert "eval_accuracy" in metrics[-1]
    assert len(samples) == 2 * 2 * 2 and samples[0]["prompt"].startswith("Reach ")
    grpo_config = json.load(open(tmp_path / "grpo" / "config.json"))
    assert grpo_config["init_from"] == str(tmp_path / "base") and grpo_config["model"]["hidden_size"] == 64
    assert os.path.exists(tmp_path / "grpo" / "tokenizer.model")
    again = train(config, str(tmp_path))  # both stages are done: nothing runs, the last metrics come back
    assert again == metrics


def test_r1_chain_reports_the_accuracy_of_every_stage(tmp_path):
    """configs/countdown_r1.py shrunk: base, cold-start SFT on the program-written searches, GRPO, rejection
    sampling + SFT, GRPO; accuracy.json holds every stage's held-out greedy accuracy, as evaluate() measures it."""
    config = countdown_r1.get_config()
    small = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, intermediate_size=128, n_routed_experts=0,
                 num_nextn_predict_layers=0, q_lora_rank=32, kv_lora_rank=32)
    for name in config.chain:
        stage = config[name]
        stage.model.update(small)
        stage.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2)
        if stage.stage == "grpo":
            stage.rl.update(group_size=2, prompts_per_step=2, max_new_tokens=8, eval_every=2, eval_problems=4,
                            samples_every=0)
    config.base.data.update(source="synthetic:explore:100", seq_len=64, batch_size=8)
    for name in ("coldstart", "rejection"):
        config[name].data.update(seq_len=128, batch_size=8)
        config[name].sft.update(examples=30, samples=2)
    config.rejection.sft.update(examples=12, keep_on=("language",))  # a 2-step model solves nothing
    train(config, str(tmp_path))
    accuracy = json.load(open(tmp_path / "accuracy.json"))
    assert list(accuracy) == list(config.chain) and all(0.0 <= a <= 1.0 for a in accuracy.values())
    coldstart = [json.loads(line) for line in open(tmp_path / "coldstart" / "examples.jsonl")]
    assert len(coldstart) == 30 and all(ex["response"].endswith("</answer>") for ex in coldstart)
    rejection = json.load(open(tmp_path / "rejection" / "config.json"))
    assert rejection["init_from"] == str(tmp_path / "base")  # R1 fine-tunes the base on the RL model's samples
    assert rejection["data"]["source"] == str(tmp_path / "rejection" / "examples.jsonl")
    final = json.load(open(tmp_path / "final" / "config.json"))
    assert final["init_from"] == str(tmp_path / "rejection")
    assert "language" in read_metrics(tmp_path / "final")[-1]
    from deepseek_jax.checkpoint import load_run
    from deepseek_jax.data import run_tokenizer
    from deepseek_jax.rl.rewards import countdown_accuracy
    from deepseek_jax.rl.rollout import sample
    cfg, params, _ = load_run(str(tmp_path / "final"))
    task = make_task("countdown", seed=config.final.seed, **config.final.rl.task_args.to_dict())
    problems = task.eval_problems()[:4]
    _, _, texts = sample(cfg, params, run_tokenizer(str(tmp_path / "final")), [p.prompt for p in problems],
                         max_prompt_tokens=64, max_new_tokens=8, stop=["</answer>"])
    expected = np.mean([countdown_accuracy(full_response(p.prompt, t), **p.reward_args)
                        for p, t in zip(problems, texts, strict=True)])
    assert accuracy["final"] == expected
