"""DeepSeek-R1's four stages (R1 sec. 2.3) at laptop scale, on Countdown, as one chain:

  python -m launch.train --config=configs/countdown_r1.py --workdir=runs/r1

  base       pretrain on the synthetic arithmetic text (as configs/countdown_r1zero.py)
  coldstart  SFT on a few hundred long chains of thought written by a program (rl.coldstart: a search over
             expressions that writes each try and its check against the target in the think block)
  reasoning  GRPO with the accuracy, format and language-consistency rewards
  rejection  rejection sampling from `reasoning` (the fully rewarded completions), then SFT on them, from `base`
             as R1 does (its stage 3 fine-tunes the base model, not the RL one)
  final      GRPO again, from `rejection`

The held-out greedy accuracy after every stage goes to workdir/accuracy.json (printed as it is measured), the GRPO
curves of both RL stages to workdir/curves.png.
"""

import ml_collections

from configs import countdown_r1zero, tiny


def get_config() -> ml_collections.ConfigDict:
    zero = countdown_r1zero.get_config()

    def sft(make: str, steps: int, init_from: str = "") -> ml_collections.ConfigDict:
        c = tiny.get_config()
        c.stage = "sft"
        c.init_from = init_from
        c.steps = steps
        c.log_every = 25
        c.eval_every = steps
        c.checkpoint_every = steps
        c.model = zero.base.model
        c.data.update(seq_len=256, batch_size=16)
        c.optim.update(lr=1e-3, warmup_steps=20, weight_decay=0.0)
        c.sft.update(make=make, examples=400, samples=4, sample_from="reasoning" if make == "rejection" else "")
        return c

    reasoning = zero.grpo.copy_and_resolve_references()
    reasoning.steps = 60
    reasoning.rl.task_args.language = "en"
    reasoning.rl.reward_weights.language = 0.1  # R1 adds it to the reward; every ASCII chain of thought scores 1
    reasoning.rl.curriculum.levels = ()  # the cold start already searches 3 numbers
    final = reasoning.copy_and_resolve_references()

    c = ml_collections.ConfigDict()
    c.chain = ("base", "coldstart", "reasoning", "rejection", "final")
    c.evaluate = "final"
    c.base = zero.base
    c.coldstart = sft("coldstart", 200)
    c.reasoning = reasoning
    c.rejection = sft("rejection", 200, init_from="base")
    c.final = final
    return c
