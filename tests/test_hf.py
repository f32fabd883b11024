"""HF checkpoint parity (logits of transformers' DeepseekV3/V2ForCausalLM), round trips and errors."""

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, tiny_config

import deepseek_jax as dsj
from deepseek_jax import fp8
from deepseek_jax.hf import CheckpointError, leaves
from deepseek_jax.safetensors_io import SafetensorsError, SafetensorsFile

FIXTURE_NAMES = ["v3_sigmoid_yarn", "v2_softmax_greedy", "v2_group_limited_yarn", "v3_fp8", "v32_dsa", "v32_fp8"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits_match_transformers(name):
    path = os.path.join(FIXTURES, name)
    cfg, params = dsj.load_hf_checkpoint(path, dtype=jnp.float32)
    ref = np.load(os.path.join(path, "reference.npz"))
    out = np.asarray(dsj.logits(cfg, params, jnp.asarray(ref["tokens"])))
    rel = np.abs(out - ref["logits"]).max() / np.abs(ref["logits"]).max()
    assert rel < 1e-4, f"{name}: max relative error {rel:.2e}"


def test_fixture_features_are_exercised():
    """The fixtures cover what the parity claim rests on."""
    v3 = dsj.ModelConfig.from_hf(os.path.join(FIXTURES, "v3_sigmoid_yarn"))
    assert v3.topk_method == "noaux_tc" and v3.scoring_func == "sigmoid"
    assert v3.yarn and v3.num_nextn_predict_layers == 1
    _, params = dsj.load_hf_checkpoint(os.path.join(FIXTURES, "v3_sigmoid_yarn"), dtype=jnp.float32)
    assert float(jnp.abs(params["layers_1"]["mlp"]["router"]["e_score_correction_bias"]).max()) > 0.05
    v2 = dsj.ModelConfig.from_hf(os.path.join(FIXTURES, "v2_softmax_greedy"))
    assert v2.q_lora_rank is None and v2.scoring_func == "softmax" and v2.topk_method == "greedy" and not v2.yarn
    assert dsj.ModelConfig.from_hf(os.path.join(FIXTURES, "v3_fp8")).fp8_weight_block == (128, 128)
    v32 = dsj.ModelConfig.from_hf(os.path.join(FIXTURES, "v32_dsa"))
    assert v32.model_type == "deepseek_v32" and (v32.index_n_heads, v32.index_head_dim, v32.index_topk) == (8, 16, 5)


@pytest.mark.parametrize("name", ["v32_dsa", "v32_fp8"])
def test_v32_sparsity_is_exercised(name):
    """index_topk 5 < the 12 reference tokens: attending to every key instead moves the logits far off."""
    path = os.path.join(FIXTURES, name)
    cfg, params = dsj.load_hf_checkpoint(path, dtype=jnp.float32)
    ref = np.load(os.path.join(path, "reference.npz"))
    dense = np.asarray(dsj.logits(cfg.replace(index_topk=ref["tokens"].shape[1]), params, jnp.asarray(ref["tokens"])))
    assert np.abs(dense - ref["logits"]).max() / np.abs(ref["logits"]).max() > 0.1


def test_mtp_weights_load_from_layer_num_hidden_layers():
    path = os.path.join(FIXTURES, "v3_sigmoid_yarn")
    cfg, params = dsj.load_hf_checkpoint(path, dtype=jnp.float32)
    from deepseek_jax.safetensors_io import SafetensorsFile as F

    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))["weight_map"]
    name = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    want = F(os.path.join(path, index[name])).get(name)
    np.testing.assert_array_equal(np.asarray(params["mtp_0"]["eh_proj"]["kernel"]), want.T)


@pytest.mark.parametrize("fp8_weights", [False, True])
def test_export_import_round_trip(tmp_path, fp8_weights):
    cfg = tiny_config(hidden_size=160)  # not a multiple of 128: partial FP8 blocks
    params = dsj.init_params(cfg, jax.random.key(0))
    dsj.export_hf_checkpoint(cfg, params, tmp_path, dtype=jnp.float32, fp8_weights=fp8_weights,
                             max_shard_bytes=300_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")  # sharded
    cfg2, params2 = dsj.load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert cfg2.replace(fp8_weight_block=None) == cfg
    by_path = {leaf.path: leaf for leaf in leaves(cfg)}
    flat, flat2 = (dict(jax.tree_util.tree_flatten_with_path(p)[0]) for p in (params, params2))
    for key, want in flat.items():
        path = tuple(k.key for k in key)
        got = np.asarray(flat2[key])
        if fp8_weights and by_path[path].fp8_eligible:
            leaf = by_path[path]
            hf = leaf.to_hf(np.asarray(want).reshape(-1, *leaf.base_shape)[0])  # first layer / expert
            q, s = fp8.quantize_weights(hf)
            want0 = leaf.to_ours(np.asarray(fp8.dequantize_weights(q, s)))
            np.testing.assert_allclose(got.reshape(-1, *leaf.base_shape)[0], want0, rtol=0, atol=0)
            assert not np.array_equal(got, np.asarray(want))  # really went through FP8
        else:
            np.testing.assert_array_equal(got, np.asarray(want), err_msg=str(path))


def _copy_fixture(tmp_path, name="v2_softmax_greedy"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def _rewrite(path, edit):
    """Rewrite model.safetensors after `edit(dict of name -> array)`."""
    from deepseek_jax.safetensors_io import write

    f = SafetensorsFile(path / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    edit(tensors)
    write(path / "model.safetensors", [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])


def test_missing_tensor_is_named(tmp_path):
    path = _copy_fixture(tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*experts\.3\.up_proj"):
        dsj.load_hf_checkpoint(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _copy_fixture(tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.1.mlp.experts.99.up_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"no place.*experts\.99"):
        dsj.load_hf_checkpoint(path)


def test_misshaped_tensor_is_named(tmp_path):
    path = _copy_fixture(tmp_path)
    _rewrite(path, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(63,\).*\(64,\)"):
        dsj.load_hf_checkpoint(path)


def test_pickle_checkpoints_are_refused(tmp_path):
    path = _copy_fixture(tmp_path)
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        dsj.load_hf_checkpoint(path)


def test_unsupported_architecture(tmp_path):
    path = _copy_fixture(tmp_path)
    cfg = json.load(open(path / "config.json"))
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    json.dump(cfg, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported architecture 'LlamaForCausalLM'"):
        dsj.load_hf_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(tmp_path, damage):
    path = _copy_fixture(tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    else:
        (n,) = struct.unpack("<Q", data[:8])
        file.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
    with pytest.raises(SafetensorsError, match="corrupt"):
        dsj.load_hf_checkpoint(path)


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="no HF config"):
        dsj.load_hf_checkpoint("/nonexistent/checkpoint")


def test_missing_mtp_layer_warns_and_initializes(tmp_path):
    name = "v3_sigmoid_yarn"
    path = _copy_fixture(tmp_path, name)
    index = json.load(open(path / "model.safetensors.index.json"))
    for file in set(index["weight_map"].values()):
        f = SafetensorsFile(path / file)
        keep = {k: np.array(f.get(k)) for k in f.keys() if not k.startswith("model.layers.3.")}
        del f
        from deepseek_jax.safetensors_io import write

        write(path / file, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in keep.items()])
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.3.")}
    json.dump(index, open(path / "model.safetensors.index.json", "w"))
    with pytest.warns(UserWarning, match="no MTP weights"):
        cfg, params = dsj.load_hf_checkpoint(path, dtype=jnp.float32)
    assert np.abs(np.asarray(params["mtp_0"]["eh_proj"]["kernel"])).max() > 0  # fresh, not zeros
    ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
    out = np.asarray(dsj.logits(cfg, params, jnp.asarray(ref["tokens"])))
    np.testing.assert_allclose(out, ref["logits"], rtol=1e-4, atol=1e-4 * np.abs(ref["logits"]).max())


def test_sharded_load_places_each_leaf(tmp_path):
    """Leaves stream straight into a NamedSharding; values equal the unsharded load."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    path = os.path.join(FIXTURES, "v3_sigmoid_yarn")
    cfg, params = dsj.load_hf_checkpoint(path, dtype=jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:4]), ("expert",))

    def spec(x):
        return NamedSharding(mesh, PartitionSpec(*([None] * (x.ndim - 3) + ["expert", None, None]))
                             if x.ndim >= 3 and x.shape[-3] == cfg.n_routed_experts else PartitionSpec())

    shardings = jax.tree_util.tree_map(spec, params)
    _, sharded = dsj.load_hf_checkpoint(path, dtype=jnp.float32, shardings=shardings)
    experts = sharded["layers_1"]["mlp"]["experts"]["gate"]
    assert experts.sharding == shardings["layers_1"]["mlp"]["experts"]["gate"]
    assert len(experts.addressable_shards) == 4
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, sharded)


def test_fp8_weights_can_stay_fp8():
    """keep_fp8: E4M3 codes and their block scales are kept; the model dequantizes them as it runs."""
    path = os.path.join(FIXTURES, "v3_fp8")
    cfg, params = dsj.load_hf_checkpoint(path, dtype=jnp.float32, keep_fp8=True)
    q_b = params["layers_1"]["attn"]["q_b"]
    assert q_b["kernel"].dtype == jnp.float8_e4m3fn
    assert q_b["kernel_scale_inv"].shape == (2, 1, 1)  # 2 layers; [ceil(48/128), ceil(4*24/128)]
    assert params["layers_1"]["mlp"]["experts"]["gate"].dtype == jnp.float8_e4m3fn
    assert params["layers_1"]["mlp"]["experts"]["gate_scale_inv"].shape == (2, 16, 2, 1)  # [.., 192/128, 32/128]
    assert params["embed"]["embedding"].dtype == jnp.float32  # never quantized
    ref = np.load(os.path.join(path, "reference.npz"))
    out = np.asarray(dsj.logits(cfg, params, jnp.asarray(ref["tokens"])))
    rel = np.abs(out - ref["logits"]).max() / np.abs(ref["logits"]).max()
    assert rel < 1e-4, rel


def test_v32_fp8_indexer_weights_can_stay_fp8():
    """V3.2 as released: the indexer's wq_b and wk are E4M3 with block scales, its head weights are not."""
    path = os.path.join(FIXTURES, "v32_fp8")
    cfg, params = dsj.load_hf_checkpoint(path, dtype=jnp.float32, keep_fp8=True)
    indexer = params["layers_0"]["attn"]["indexer"]
    assert indexer["wq_b"]["kernel"].dtype == jnp.float8_e4m3fn and "kernel_scale_inv" in indexer["wq_b"]
    assert indexer["wk"]["kernel"].dtype == jnp.float8_e4m3fn
    assert indexer["weights_proj"]["kernel"].dtype == jnp.float32 and "kernel_scale_inv" not in indexer["weights_proj"]
    ref = np.load(os.path.join(path, "reference.npz"))
    out = np.asarray(dsj.logits(cfg, params, jnp.asarray(ref["tokens"])))
    assert np.abs(out - ref["logits"]).max() / np.abs(ref["logits"]).max() < 1e-4


def test_v32_checkpoint_without_indexer_names_the_missing_keys(tmp_path):
    path = tmp_path / "v32"
    shutil.copytree(os.path.join(FIXTURES, "v32_fp8"), path)
    _rewrite(path, lambda t: [t.pop(k) for k in list(t) if ".indexer." in k])
    with pytest.raises(CheckpointError, match=r"indexer tensors are missing.*self_attn\.indexer\.k_norm"):
        dsj.load_hf_checkpoint(path)


@pytest.mark.parametrize("fp8_weights", [False, True])
def test_v32_export_round_trip(tmp_path, fp8_weights):
    """A DSA model exports as DeepseekV32ForCausalLM (indexer tensors under self_attn.indexer) and loads back."""
    cfg = tiny_config(index_n_heads=4, index_head_dim=16, index_topk=4)
    params = dsj.init_params(cfg, jax.random.key(0))
    dsj.export_hf_checkpoint(cfg, params, tmp_path, dtype=jnp.float32, fp8_weights=fp8_weights)
    hf = json.load(open(tmp_path / "config.json"))
    assert hf["architectures"] == ["DeepseekV32ForCausalLM"] and hf["model_type"] == "deepseek_v32"
    assert (hf["index_n_heads"], hf["index_head_dim"], hf["index_topk"]) == (4, 16, 4)
    names = SafetensorsFile(tmp_path / "model.safetensors").keys()
    assert "model.layers.0.self_attn.indexer.k_norm.bias" in names
    assert ("model.layers.0.self_attn.indexer.wk.weight_scale_inv" in names) == fp8_weights
    assert "model.layers.0.self_attn.indexer.weights_proj.weight_scale_inv" not in names
    cfg2, params2 = dsj.load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert cfg2.replace(fp8_weight_block=None) == cfg.replace(model_type="deepseek_v32")
    wk, wk2 = (np.asarray(p["layers_1"]["attn"]["indexer"]["wk"]["kernel"][0]) for p in (params, params2))
    if fp8_weights:  # the E4M3 blocks of the [out, in] HF matrix, dequantized
        np.testing.assert_array_equal(wk2, np.asarray(fp8.dequantize_weights(*fp8.quantize_weights(wk.T))).T)
    else:
        np.testing.assert_array_equal(wk2, wk)
        tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
        np.testing.assert_array_equal(dsj.logits(cfg2, params2, tokens), dsj.logits(cfg, params, tokens))
