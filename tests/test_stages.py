"""DSA training stages (train/step.py, train/start.py, stages.py; V3.2 sec. 2.1): the warm-up trains only the
indexer, the sparse stage keeps the indexer's loss away from the main model, a V3 model gains a fresh indexer, and
the chain base -> dsa_warmup -> dsa_sparse runs from launch.train."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import traverse_util

import deepseek_jax as dsj
from deepseek_jax.train.losses import sum_indexer_loss
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.start import initial_params
from deepseek_jax.train.step import batch_targets, init_state, is_indexer, loss_terms, train_step

OPTIM = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, decay_start=1.0, final_lr_ratio=0.1, b1=0.9, b2=0.95,
                                       eps=1e-8, weight_decay=0.1, clip=1.0, moment_dtype="float32"))
DSA = dict(index_n_heads=4, index_head_dim=16, index_topk=6, attention_chunk=8)
SMALL = dict(num_hidden_layers=2, num_nextn_predict_layers=0)  # 1 dense + 1 MoE layer: quick to compile


def _batch(cfg, rows=4, length=16):
    tokens = jax.random.randint(jax.random.key(3), (rows, length), 0, cfg.vocab_size)
    return {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(length), (rows, length)),
            "segment_ids": jnp.ones((rows, length), jnp.int32)}


def test_warmup_step_moves_only_the_indexer():
    """dsa_warmup: dense attention, the main model frozen (no update, no weight decay, no bias update)."""
    cfg = tiny_config(**DSA, **SMALL)
    tx, schedule = make_optimizer(OPTIM, 10, trainable=is_indexer)
    params = dsj.init_params(cfg, jax.random.key(0))
    step = jax.jit(functools.partial(train_step, cfg=cfg.replace(dsa_mode="dense"), tx=tx, schedule=schedule,
                                     mtp_lambda=0.3, bias_update_speed=0.0, trainable=is_indexer))
    state, metrics = step(init_state(params, tx), _batch(cfg))
    before, after = (traverse_util.flatten_dict(p) for p in (params, state.params))
    moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert moved and all(is_indexer(k) for k in moved), sorted(moved)[:3]
    assert {k for k in before if is_indexer(k) and k[-1] == "kernel"} <= moved
    assert metrics["loss"] == metrics["indexer_kl"] > 0 and 0 < metrics["indexer_mass"] < 1


def test_sparse_stage_keeps_the_indexer_loss_off_the_main_model():
    """dsa_sparse: the main params' gradient is the LM loss's alone, the indexer's the KL's alone (its inputs
    are detached and the selection carries no gradient)."""
    cfg = tiny_config(**DSA, **SMALL)
    params = dsj.init_params(cfg, jax.random.key(0))
    batch = _batch(cfg)
    n = jnp.maximum(batch_targets(batch, 1)[1].sum(), 1).astype(jnp.float32)

    def lm_only(p):
        loss, aux = loss_terms(cfg, p, batch, 0.3, n)
        return loss - aux["indexer_kl"]

    def kl_only(p):
        out = dsj.forward(cfg, p, batch["tokens"], batch["positions"], batch["segment_ids"], indexer_loss=True)
        return sum_indexer_loss(out.indexer_stats)

    full, lm, kl = jax.jit(lambda p: (jax.grad(lambda q: loss_terms(cfg, q, batch, 0.3, n)[0])(p),
                                      jax.grad(lm_only)(p), jax.grad(kl_only)(p)))(params)
    for path, g in traverse_util.flatten_dict(full).items():
        lm_g, kl_g = (np.asarray(traverse_util.flatten_dict(t)[path]) for t in (lm, kl))
        if is_indexer(path):
            assert not lm_g.any(), path
            np.testing.assert_allclose(np.asarray(g), kl_g, rtol=1e-5, atol=1e-8)
        else:
            assert not kl_g.any(), path
            np.testing.assert_allclose(np.asarray(g), lm_g, rtol=1e-5, atol=1e-8)
    assert any(np.asarray(v).any() for k, v in traverse_util.flatten_dict(kl).items() if is_indexer(k))


def test_init_from_a_v3_checkpoint_adds_a_fresh_indexer(tmp_path):
    """V3 -> V3.2 as DeepSeek did it: the V3 weights load, the indexer keeps its fresh initialization."""
    v3 = tiny_config()
    dsj.export_hf_checkpoint(v3, dsj.init_params(v3, jax.random.key(5)), tmp_path, dtype=jnp.float32)
    fresh = dsj.init_params(tiny_config(**DSA), jax.random.key(0))
    loaded = traverse_util.flatten_dict(initial_params(str(tmp_path), fresh))
    want = traverse_util.flatten_dict(dsj.load_hf_checkpoint(tmp_path, dtype=jnp.float32)[1])
    for path, x in traverse_util.flatten_dict(fresh).items():
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(x if is_indexer(path) else want[path]))
    assert any(is_indexer(p) for p in loaded)


def test_dsa_chain_through_launch_train(tmp_path):
    """configs/tiny_dsa.py, a few steps per stage: base (V3) -> dsa_warmup (fresh indexer, step-0 eval) ->
    dsa_sparse; rerunning resumes (every stage done); dsa_sparse on a model without an indexer is an error."""
    small = ["--config.{s}.steps={n}", "--config.{s}.log_every=2", "--config.{s}.eval_every=2",
             "--config.{s}.eval_batches=1", "--config.{s}.data.batch_size=8", "--config.{s}.data.seq_len=64",
             "--config.{s}.model.index_topk=8", "--config.{s}.model.num_hidden_layers=2",
             "--config.{s}.model.num_nextn_predict_layers=0"]
    args = [a.format(s=s, n=n) for s, n in (("base", 4), ("dsa_warmup", 2), ("dsa_sparse", 2)) for a in small
            if not (s == "base" and "index_topk" in a)]
    cmd = [sys.executable, "-m", "launch.train", "--config=configs/tiny_dsa.py", f"--workdir={tmp_path}", *args]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    warm = [json.loads(line) for line in open(tmp_path / "dsa_warmup" / "metrics.jsonl")]
    assert warm[0]["step"] == 0 and 0 < warm[0]["eval_indexer_mass"] < 1  # the fresh indexer, before any step
    assert warm[-1]["eval_loss"] == warm[0]["eval_loss"]  # the main model is frozen
    assert warm[-1]["eval_indexer_kl"] < warm[0]["eval_indexer_kl"]  # the indexer learns to follow attention
    sparse = [json.loads(line) for line in open(tmp_path / "dsa_sparse" / "metrics.jsonl")]
    assert sparse[-1]["step"] == 2 and np.isfinite(sparse[-1]["ce"]) and sparse[-1]["indexer_kl"] > 0
    model = json.load(open(tmp_path / "dsa_sparse" / "config.json"))["model"]
    assert (model["index_n_heads"], model["index_topk"]) == (4, 8)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done") >= 1 and "stage dsa_sparse: done" in again.stdout
    bad = subprocess.run([sys.executable, "-m", "launch.train", f"--workdir={tmp_path / 'bad'}",
                          "--config.stage=dsa_sparse"], capture_output=True, text=True, cwd=root, timeout=300)
    assert bad.returncode != 0 and "no indexer" in bad.stderr


@pytest.mark.parametrize("bad", [{"index_head_dim": 8}, {"index_topk": 0}])
def test_bad_indexer_configs_fail_before_compiling(bad):
    with pytest.raises(dsj.ConfigError, match=next(iter(bad))):
        tiny_config(**(DSA | bad))
