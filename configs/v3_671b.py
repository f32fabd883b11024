"""DeepSeek-V3 671B (37B activated): the real shapes, with V3's training precision and a pod plan.

bf16 compute with full remat per block, f32 master weights, bf16 Adam moments; FSDP over the
`fsdp` axis and routed experts over `expert`. Sequence length 4096 as in V3 pretraining. To fit
128 chips (v5p-256), the optimizer state lives in host memory, the routed experts' gradients are
bf16, and the output head + CE run 512 positions at a time.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.steps = 1000
    c.model = tiny.model_fields(  # the V3 defaults, with memory-bounded attention and expert dispatch
        initializer_range=0.006, dtype="bfloat16", remat="full", attention_chunk=256, moe_chunk_tokens=512,
        unroll_layers=0)  # the 3 dense blocks stay a loop: unrolled, XLA overlaps their remats (+3.7 GiB per chip)
    # one 4096-token row per chip on v5p-256 (128 chips), 512K tokens a step; v5p-512 takes batch_size=256
    c.mtp_lambda = 0.3
    c.bias_update_speed = 1e-3
    c.ce_chunk = 512
    c.expert_grad_dtype = "bfloat16"
    c.data.seq_len = 4096
    c.data.batch_size = 128
    c.optim.update(lr=2.2e-4, warmup_steps=2000, decay_start=0.7, final_lr_ratio=0.1, moment_dtype="bfloat16",
                   offload=True)
    c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
    return c
