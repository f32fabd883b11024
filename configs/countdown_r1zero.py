"""R1-Zero at laptop scale: a tiny base model learns arithmetic from generated text, then GRPO on Countdown.

  python -m launch.train --config=configs/countdown_r1zero.py --workdir=runs/r1zero

Stage `base` pretrains the tiny V3-style model on synthetic arithmetic text (data.synthetic.arithmetic_corpus, the
"combine" mix: "Combine 7, 8 and 11: (11 + 8) * 7 = 133." lines, some worked in the <think>/<answer> format, and
times tables; never a target, so never a Countdown problem). Stage `grpo` then runs GRPO on Countdown ("Reach 46.
Combine 3, 7 and 25.") with the rule-based accuracy and format rewards, R1-Zero style (no SFT, temperature 1, a
small KL to the frozen base). Each stage has its own subfolder; rerunning resumes whichever was running.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    base = tiny.get_config()
    base.steps = 1200  # a tiny model starts to copy the listed numbers into its expressions after ~1000 steps
    base.log_every = 25
    base.eval_every = 400
    base.checkpoint_every = 400
    base.data.update(source="synthetic:combine:2000", seq_len=256, batch_size=16)
    base.model.update(vocab_size=384, max_position_embeddings=512)
    base.optim.update(lr=3e-3, warmup_steps=50)

    grpo = tiny.get_config()
    grpo.stage = "grpo"
    grpo.steps = 120
    grpo.log_every = 5
    grpo.checkpoint_every = 40
    grpo.model.update(vocab_size=384, max_position_embeddings=512)
    grpo.optim.update(lr=5e-5, warmup_steps=10, decay_start=1.0, weight_decay=0.0)  # 5e-4: KL > 1 by step 50
    grpo.rl.update(
        task="countdown", group_size=8, prompts_per_step=8, beta=0.001, max_prompt_tokens=64, max_new_tokens=64,
        temperature=1.0, eval_every=20, eval_problems=100, samples_every=20)
    grpo.rl.task_args.update(num_numbers=(3, 3), max_number=10, max_target=50, eval_size=200, template="reach")

    c = ml_collections.ConfigDict()
    c.chain = ("base", "grpo")
    c.base = base
    c.grpo = grpo
    return c
