"""The default run: a tiny V3-style model (MLA + DeepSeekMoE + MTP) on the embedded corpus.

Learns visibly on 2 CPU cores in a few minutes: python -m launch.train
"""

import dataclasses

import ml_collections

from deepseek_jax.config import ModelConfig


def model_fields(**kw) -> ml_collections.ConfigDict:
    """Every ModelConfig field (so each can be overridden with --config.model.X), validated now."""
    return ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(**kw)))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"
    c.seed = 0
    c.steps = 300
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 4
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.init_from = ""  # a workdir or orbax params directory to start from (fine-tuning)
    c.grad_accum = 1
    c.ce_chunk = 0  # positions per slice of the output head + CE, each rematerialized (0 = all at once)
    c.expert_grad_dtype = "float32"  # "bfloat16": routed-expert gradients in bf16 (half the step's largest buffer)
    c.mtp_lambda = 0.3  # V3: 0.3 for the first 10T tokens, then 0.1
    c.bias_update_speed = 1e-3  # gamma of the auxiliary-loss-free bias update; 0 turns it off
    c.model = model_fields(
        vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, rope_type="default", rope_factor=1.0,
        max_position_embeddings=1024, initializer_range=0.02, dtype="float32", remat="none", moe_impl="auto",
    )
    c.data = ml_collections.ConfigDict(dict(source="default", tokenizer="", seq_len=128, batch_size=16))
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=30, decay_start=0.5, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1, clip=1.0, moment_dtype="float32",
        offload=False))  # offload: optimizer state in pinned host memory, on the device only for the update
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
    c.rl = rl_fields()
    # chat: render `messages` with the chat template. make: in a chain, write the examples first ("coldstart" or
    # "rejection", deepseek_jax.stages), for `examples` problems with `samples` completions each of the stage
    # `sample_from` (rejection; default: the stage it starts from), kept when the rewards in `keep_on` (default: all
    # of the task's) are 1
    c.sft = ml_collections.ConfigDict(dict(chat=False, make="", examples=300, samples=8, sample_from="",
                                           keep_on=()))
    return c


def rl_fields(**kw) -> ml_collections.ConfigDict:
    """GRPO settings (stage="grpo"): DeepSeekMath's defaults where they exist."""
    rl = ml_collections.ConfigDict(dict(
        task="countdown",
        task_args=ml_collections.ConfigDict(dict(num_numbers=(3, 4), max_number=25, max_target=100, eval_size=200,
                                                 template="r1")),
        group_size=8,  # G completions per prompt
        prompts_per_step=8,
        mu=1,  # optimizer steps per rollout batch
        epsilon=0.2,  # the clip range's lower side (DAPO's epsilon_low)
        epsilon_high=0.2,  # its upper side; DAPO's clip-higher: 0.28
        dynamic_sampling=0,  # DAPO: up to this many extra rollout rounds to replace groups whose rewards are all equal
        overlong_buffer=0,  # DAPO's soft overlong punishment over the last N of max_new_tokens (0 = off)
        beta=0.04,  # KL weight (DeepSeekMath 0.04; R1-Zero 0.001)
        loss_type="grpo",  # grpo | bnpo | dr_grpo
        max_prompt_tokens=128,
        max_new_tokens=64,
        temperature=1.0,
        top_p=1.0,
        stop=("</answer>",),
        chat=False,  # HF chat models: the prompt as a user turn of the chat template, the reply opened with <think>
        reward_weights=ml_collections.ConfigDict(dict(accuracy=1.0, format=1.0)),
        ref_refresh_every=0,  # 0 = never (R1: every 400 steps)
        routing_replay=True,  # replay the rollout's MoE routes in the update (V3.2 "Keep Routing")
        # train problems from easier task settings first: task_args[arg] = levels[k], rising a level when the
        # running (EMA) sampled accuracy reaches advance_at; the eval set keeps task_args (rl.curriculum)
        curriculum=ml_collections.ConfigDict(dict(arg="", levels=(), advance_at=0.5, ema=0.9)),
        eval_every=25,
        eval_problems=64,
        samples_every=10,
    ))
    rl.update(kw)
    return rl
