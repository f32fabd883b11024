"""DeepSeek-V3 671B (37B activated): the real shapes, with V3's training precision and a pod plan.

bf16 compute with full remat per block, f32 master weights, bf16 Adam first moment; FSDP over the
`fsdp` axis and routed experts over `expert`. Sequence length 4096 as in V3 pretraining.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.steps = 1000
    c.model = tiny.model_fields(initializer_range=0.006, dtype="bfloat16", remat="full")  # the V3 defaults
    c.mtp_lambda = 0.3
    c.bias_update_speed = 1e-3
    c.data.seq_len = 4096
    c.data.batch_size = 512
    c.optim.update(lr=2.2e-4, warmup_steps=2000, decay_start=0.7, final_lr_ratio=0.1, mu_dtype="bfloat16")
    c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
    return c
