"""A ~100M-parameter V3-style MoE for one GPU (bf16): 8 layers, 32 routed experts, top-4, MTP."""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.steps = 2000
    c.log_every = 20
    c.eval_every = 500
    c.checkpoint_every = 500
    c.model = tiny.model_fields(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
        num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, rope_type="default", rope_factor=1.0,
        max_position_embeddings=4096, initializer_range=0.02, dtype="bfloat16", remat="none",
    )
    c.data.seq_len = 1024
    c.data.batch_size = 32
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    return c
