"""DeepSeek-V2-Lite shapes (15.7B total, 2.4B activated): MLA without q compression, 64 experts top-6.

Needs a tokenizer with 102400 pieces (data.tokenizer=...) or init_from a converted checkpoint.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.steps = 1000
    c.model = tiny.model_fields(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, first_k_dense_replace=1,
        aux_loss_alpha=0.001, num_nextn_predict_layers=0, rope_type="yarn", rope_factor=40.0,
        original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707,
        max_position_embeddings=163840, initializer_range=0.02, dtype="bfloat16", remat="full",
    )
    c.bias_update_speed = 0.0  # V2 balances with auxiliary losses, not the V3 bias
    c.data.seq_len = 4096
    c.data.batch_size = 8
    c.optim.lr = 4.2e-4
    c.optim.warmup_steps = 100
    c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
    return c
