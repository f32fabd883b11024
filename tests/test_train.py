"""launch.train: learning, exact resume after kill -9, bias balancing, and clear failures."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import tiny
from deepseek_jax.checkpoint import CheckpointError
from deepseek_jax.config import ConfigError
from launch.train import train

SMALL = {  # a 2-layer model that compiles fast
    "steps": 12, "log_every": 2, "eval_every": 6, "eval_batches": 1, "checkpoint_every": 4,
    "model.vocab_size": 512, "model.hidden_size": 64, "model.num_hidden_layers": 2, "model.intermediate_size": 128,
    "model.moe_intermediate_size": 32, "model.n_routed_experts": 8, "model.n_group": 2, "model.topk_group": 2,
    "model.num_experts_per_tok": 2, "model.q_lora_rank": 32, "model.kv_lora_rank": 32,
    "model.qk_nope_head_dim": 16, "model.qk_rope_head_dim": 8, "model.v_head_dim": 16,
    "data.seq_len": 64, "data.batch_size": 8, "optim.warmup_steps": 2,
}


def small_config(**overrides):
    config = tiny.get_config()
    for key, value in (SMALL | overrides).items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def cli(workdir, **overrides):
    args = [f"--config.{k}={v}" for k, v in (SMALL | overrides).items()]
    return [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *args]


def losses(workdir):
    return [(m["step"], m["loss"]) for m in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))]


def test_loss_falls_and_run_dir_is_complete(tmp_path):
    metrics = train(small_config(steps=40, log_every=5, eval_every=20), str(tmp_path))
    first, last = metrics[0], metrics[-1]
    uniform = np.log(512)  # the cross-entropy of guessing uniformly over the vocabulary
    assert last["step"] == 40 and last["ce"] < uniform - 1.0 and last["ce"] < first["ce"] - 0.5, (first, last)
    assert last["eval_loss"] < metrics[3]["ce"] + 1.0
    for key in ("loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s", "mfu", "expert_load_max_mean"):
        assert np.isfinite(last[key]), key
    assert os.path.isdir(tmp_path / "checkpoints" / "40")
    assert json.load(open(tmp_path / "config.json"))["steps"] == 40
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_kill_and_resume_reproduces_losses(tmp_path):
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cli(straight, steps=40), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cli(killed, steps=40), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.isdir(killed / "checkpoints" / "8") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(losses(killed)) < 20
    subprocess.run(cli(killed, steps=40), check=True, env=env, capture_output=True)
    assert losses(killed) == losses(straight)
    assert [s for s, _ in losses(killed)] == list(range(2, 41, 2))


def test_bias_update_balances_experts(tmp_path):
    def imbalance(speed, name):
        metrics = train(small_config(steps=30, bias_update_speed=speed, log_every=3), str(tmp_path / name))
        return np.mean([m["expert_load_max_mean"] for m in metrics[-4:]])

    assert imbalance(0.01, "bias") < imbalance(0.0, "no_bias") - 0.1


@pytest.mark.parametrize("arg,message", [
    ("--config.model.hiden_size=3", "hiden_size"),
    ("--config.steps=many", "steps"),
    ("--config.model.n_group=3", "n_group=3"),
])
def test_bad_overrides_fail_before_compiling(tmp_path, arg, message):
    out = subprocess.run([sys.executable, "-m", "launch.train", f"--workdir={tmp_path}", arg],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert message in out.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_unknown_model_key_is_named(tmp_path):
    config = small_config()
    with config.unlocked():
        config.model.kv_lora = 7
    with pytest.raises(ConfigError, match="unknown keys \\['kv_lora'\\]"):
        train(config, str(tmp_path))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step run, copied by the tests that damage it."""
    path = tmp_path_factory.mktemp("four_steps")
    train(small_config(steps=4), str(path))
    return path


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_nan_halts_and_keeps_last_good_checkpoint(four_steps, tmp_path):
    tmp_path = copy_of(four_steps, tmp_path)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step \d+.*last good checkpoint \(step 4\)"):
        train(small_config(steps=12, **{"optim.lr": 1e30, "optim.clip": 1e30}), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_corrupt_checkpoint_is_an_error(four_steps, tmp_path):
    tmp_path = copy_of(four_steps, tmp_path)
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(CheckpointError, match=r"step 4.*cannot be restored"):
        train(small_config(steps=8), str(tmp_path))


def test_metrics_without_checkpoint_is_an_error(four_steps, tmp_path):
    tmp_path = copy_of(four_steps, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(small_config(steps=8), str(tmp_path))
