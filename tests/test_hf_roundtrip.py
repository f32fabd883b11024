"""A checkpoint written by our exporter gives transformers' logits (tests/fixtures/hf/roundtrip, made by
tests/fixtures/make_inference_fixtures.py with transformers 5.24 from the same params)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dsj
from configs import tiny
from deepseek_jax.config import ModelConfig

REF = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "roundtrip", "reference.npz")
NOISE = 0.05  # as ROUNDTRIP_NOISE in the fixture script


def roundtrip_params():
    """Exactly the fixture script's params: the default training config's model, init_params(key 0), plus
    0.05 * N(0, 1) on every leaf from keys split off jax.random.key(1) in tree-flatten order."""
    cfg = ModelConfig(**tiny.get_config().model.to_dict())
    params = dsj.init_params(cfg, jax.random.key(0))

    @jax.jit
    def perturb(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [x + NOISE * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, noisy)

    return cfg, perturb(params)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg, params = roundtrip_params()
    path = tmp_path_factory.mktemp("export")
    dsj.export_hf_checkpoint(cfg, params, path, dtype=jnp.float32)
    return cfg, params, path


def test_export_load_matches_transformers(exported):
    _, params, path = exported
    ref = np.load(REF)
    loaded_cfg, loaded = dsj.load_hf_checkpoint(path, dtype=jnp.float32)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)  # f32 export + import is exact
    out = np.asarray(dsj.logits(loaded_cfg, loaded, jnp.asarray(ref["tokens"])))
    rel = np.abs(out - ref["logits"]).max() / np.abs(ref["logits"]).max()
    assert rel < 1e-5, rel


def test_exported_config_sets_kv_heads(exported):
    cfg, _, path = exported
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config.get("num_key_value_heads") == cfg.num_attention_heads
