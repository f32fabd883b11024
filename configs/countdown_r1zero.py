"""R1-Zero at laptop scale: a tiny base model learns arithmetic from generated text, then GRPO on Countdown.

  python -m launch.train --config=configs/countdown_r1zero.py --workdir=runs/r1zero

Stage `base` pretrains the tiny V3-style model on synthetic arithmetic text (rl.tasks.arithmetic_corpus: facts,
step-by-step evaluations, worked examples in the <think>/<answer> format; never a Countdown problem). Stage `grpo`
then runs GRPO on Countdown with the rule-based accuracy and format rewards, R1-Zero style (no SFT, temperature 1,
a small KL to the frozen base). Each stage has its own subfolder; rerunning resumes whichever was running.
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    base = tiny.get_config()
    base.steps = 400
    base.log_every = 25
    base.eval_every = 200
    base.checkpoint_every = 200
    base.data.update(source="synthetic:arithmetic:2000", seq_len=256, batch_size=16)
    base.model.update(vocab_size=512, max_position_embeddings=512)
    base.optim.update(lr=3e-3, warmup_steps=50)

    grpo = tiny.get_config()
    grpo.stage = "grpo"
    grpo.steps = 300
    grpo.log_every = 5
    grpo.checkpoint_every = 50
    grpo.model.update(vocab_size=512, max_position_embeddings=512)
    grpo.optim.update(lr=5e-4, warmup_steps=10, decay_start=1.0, weight_decay=0.0)
    grpo.rl.update(
        task="countdown", group_size=8, prompts_per_step=8, beta=0.001, max_prompt_tokens=64, max_new_tokens=64,
        temperature=1.0, eval_every=25, eval_problems=100, samples_every=25)
    grpo.rl.task_args.update(num_numbers=(3, 3), max_number=10, max_target=50, eval_size=200, template="combine")

    c = ml_collections.ConfigDict()
    c.chain = ("base", "grpo")
    c.base = base
    c.grpo = grpo
    return c
