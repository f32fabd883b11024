"""launch.generate and launch.convert_hf --to_hf on a training run and on a HF directory with tokenizer.json."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, tiny_config
from test_train import small_config

import deepseek_jax as dsj
from deepseek_jax.checkpoint import load_run
from deepseek_jax.data import HFTokenizer, run_tokenizer
from launch import convert_hf, generate
from launch.train import train

TOKENIZER = os.path.join(FIXTURES, "tokenizer")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train(small_config(steps=4, log_every=2, eval_every=4, checkpoint_every=4), workdir)
    return workdir


@pytest.fixture(scope="module", params=["v3", "v32"])
def hf_dir(tmp_path_factory, request):
    """A random V3-style model whose vocabulary fits the fixture tokenizer, with its tokenizer files; "v32" adds
    DSA's indexer with a top-k (4) shorter than the prompt, so decoding attends to selected keys."""
    path = tmp_path_factory.mktemp("hf")
    dsa = dict(index_n_heads=2, index_head_dim=16, index_topk=4) if request.param == "v32" else {}
    cfg = tiny_config(vocab_size=HFTokenizer.from_dir(TOKENIZER).vocab_size, max_position_embeddings=256, **dsa)
    dsj.export_hf_checkpoint(cfg, dsj.init_params(cfg, jax.random.key(0)), path, dtype=jnp.float32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, name), path)
    return str(path)


def jsonl(capsys, argv):
    generate.main(argv)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_workdir_jsonl_equals_library_generate(run, capsys):
    rows = jsonl(capsys, ["--workdir", run, "--prompt", "def f(x):", "--prompt", "The", "--max_new_tokens", "6",
                          "--format=jsonl"])
    cfg, params, step = load_run(run)
    tok = run_tokenizer(run)
    assert step == 4 and [r["prompt"] for r in rows] == ["def f(x):", "The"]
    assert tok.path == os.path.join(run, "tokenizer.model")  # the run saved its tokenizer
    for r in rows:
        assert r["prompt_token_ids"] == tok.encode(r["prompt"])
        want = dsj.infer.complete(cfg, params, np.asarray([r["prompt_token_ids"]]), 6, eos_id=tok.eos_id)
        assert r["completion_token_ids"] == want.completions[0, :want.num_generated[0]].tolist()
        ids = [i for i in r["completion_token_ids"] if i != tok.eos_id]
        assert r["completion"] == tok.decode(ids)


def test_workdir_text_streams_and_speculative_reports_acceptance(run, capsys):
    generate.main(["--workdir", run, "--prompt", "In Python", "--prompt", "x", "--max_new_tokens", "8",
                   "--speculative", "--chunk", "2"])
    out, err = capsys.readouterr()
    assert "=== [0] In Python\nIn Python" in out and "=== [1] x\nx" in out
    assert "MTP drafts accepted" in err and "tokens/s" in err


def test_hf_dir_chat_renders_the_template_like_transformers(hf_dir, capsys):
    ref = next(c for c in json.load(open(os.path.join(TOKENIZER, "reference.json")))["conversations"]
               if c["name"] == "user_only")
    (row,) = jsonl(capsys, ["--hf_dir", hf_dir, "--chat", "--prompt", ref["messages"][0]["content"],
                            "--max_new_tokens", "5", "--format=jsonl"])
    assert row["prompt_token_ids"] == ref["input_ids"]  # transformers' apply_chat_template(..., tokenize=True)
    cfg, params = dsj.load_hf_checkpoint(hf_dir, dtype=jnp.float32)
    want = dsj.generate(cfg, params, np.asarray([ref["input_ids"]]), 5)[0, len(ref["input_ids"]):]
    assert row["completion_token_ids"] == want[:len(row["completion_token_ids"])].tolist()


def test_bad_requests_exit_with_clear_errors(run, tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as e:
            generate.main(argv)
        return str(e.value.code)

    assert "max_len=3" in error(["--workdir", run, "--prompt", "a long prompt here", "--max_len", "3"])
    assert "chat_template" in error(["--workdir", run, "--prompt", "hi", "--chat"])
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(os.path.join(run, "config.json"), empty)
    assert "no checkpoint" in error(["--workdir", str(empty), "--prompt", "hi"])
    other = json.load(open(os.path.join(run, "config.json")))
    other["model"]["hidden_size"] = 96  # config.json no longer matches the saved weights
    shutil.copytree(os.path.join(run, "checkpoints"), tmp_path / "mismatch" / "checkpoints")
    json.dump(other, open(tmp_path / "mismatch" / "config.json", "w"))
    assert "cannot restore the params of step 4" in error(["--workdir", str(tmp_path / "mismatch"), "--prompt", "hi"])
    assert "no prompts" in error(["--workdir", run])


def test_convert_hf_exports_a_training_run(run, tmp_path):
    convert_hf.main(["--to_hf", "--params", run, "--out", str(tmp_path / "hf"), "--dtype", "float32"])
    cfg, params, _ = load_run(run)
    hf_cfg, hf_params = dsj.load_hf_checkpoint(tmp_path / "hf", dtype=jnp.float32)
    tokens = jnp.asarray([[5, 9, 200, 3, 17]])
    np.testing.assert_array_equal(dsj.logits(hf_cfg, hf_params, tokens), dsj.logits(cfg, params, tokens))
