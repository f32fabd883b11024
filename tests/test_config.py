"""ModelConfig: HF config.json reading and validation."""

import pytest

from deepseek_jax import ConfigError, ModelConfig

V3_671B = {  # the released DeepSeek-V3 config.json (fields that matter)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "max_position_embeddings": 163840, "initializer_range": 0.02, "tie_word_embeddings": False,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16", "dtype": "bfloat16",
}
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
    "rope_theta": 10000, "max_position_embeddings": 163840,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


def test_v3_671b_from_hf():
    cfg = ModelConfig.from_hf(V3_671B)
    assert cfg == ModelConfig(initializer_range=0.02, fp8_weight_block=(128, 128))  # defaults are V3
    assert cfg.dtype == "float32"  # HF's "dtype" field is not our compute dtype
    assert cfg.layer_segments == ((False, 0, 3), (True, 3, 58))
    # V3: softmax scale = (128 + 64)^-0.5 * (0.1 ln 40 + 1)^2
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 3.6888794541139363 + 1) ** 2)


def test_v2_lite_from_hf():
    cfg = ModelConfig.from_hf(V2_LITE)
    assert cfg.model_type == "deepseek_v2" and cfg.q_lora_rank is None and cfg.num_nextn_predict_layers == 0
    assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("softmax", "greedy", False)
    assert (cfg.mscale, cfg.mscale_all_dim, cfg.rope_factor) == (0.707, 0.707, 40.0)
    assert cfg.aux_loss_alpha == 0.001


def test_rope_parameters_spelling():
    hf = dict(V2_LITE)
    hf.pop("rope_scaling")
    hf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e4, "factor": 8.0,
                             "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1}
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor, cfg.original_max_position_embeddings) == \
        ("yarn", 5e4, 8.0, 2048)
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    assert not ModelConfig.from_hf(hf).yarn


def test_to_hf_round_trip():
    for hf in (V3_671B, V2_LITE):
        cfg = ModelConfig.from_hf(hf)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("field,value,match", [
    ("n_group", 7, "n_group=7.*divisible"),
    ("topk_group", 9, "topk_group=9.*n_group=8"),
    ("num_experts_per_tok", 200, r"num_experts_per_tok=200.*\[1, 128\]"),
    ("scoring_func", "relu", "scoring_func='relu'"),
    ("topk_method", "top1", "topk_method='top1'"),
    ("first_k_dense_replace", 62, "first_k_dense_replace=62"),
    ("qk_rope_head_dim", 63, "qk_rope_head_dim=63.*even"),
])
def test_inconsistent_configs_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(V3_671B | {field: value})


def test_unsupported_rope_and_quantization():
    with pytest.raises(ConfigError, match="'dynamic'"):
        ModelConfig.from_hf(V3_671B | {"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="quantization_config"):
        ModelConfig.from_hf(V3_671B | {"quantization_config": {"quant_method": "gptq"}})


def test_moe_layer_freq_segments():
    cfg = ModelConfig(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    assert cfg.layer_segments == ((False, 0, 2), (True, 2, 1), (False, 3, 1), (True, 4, 1), (False, 5, 1))
