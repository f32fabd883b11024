"""GRPO with and without MoE routing replay (V3.2 "Keep Routing"), from the same base model.

  python benchmarks/routing_replay.py --base=runs/r1zero/base [--steps 40] [--mu 2]

With mu > 1 the later updates of a rollout batch are off-policy: the policy has moved, and without replay a token
may be routed to other experts than when its old log-prob was computed, so the ratio pi/pi_old mixes a small
parameter change with a discrete change of path. Replay keeps the rollout's experts. Prints the mean clip fraction,
|ratio - 1| proxy (ratio range) and the reward curve of both runs; the last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from configs import countdown_r1zero
from deepseek_jax.rl.trainer import train_grpo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="a finished base run (stage `base` of countdown_r1zero)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--mu", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="routing_replay_")
    result = {}
    for replay in (True, False):
        config = countdown_r1zero.get_config().grpo
        config.init_from = os.path.abspath(args.base)
        config.steps, config.log_every, config.checkpoint_every = args.steps, 1, args.steps
        config.rl.update(mu=args.mu, routing_replay=replay, eval_every=0, samples_every=0)
        metrics = train_grpo(config, os.path.join(out, f"replay_{replay}"))
        clip = [m["clip_fraction"] for m in metrics]
        reward = [m["reward"] for m in metrics]
        spread = [m["ratio_max"] - m["ratio_min"] for m in metrics]
        result[f"replay={replay}"] = {"clip_fraction_mean": float(np.mean(clip)), "ratio_spread_mean":
                                      float(np.mean(spread)), "reward_first10": float(np.mean(reward[:10])),
                                      "reward_last10": float(np.mean(reward[-10:]))}
        print(f"routing replay {'on ' if replay else 'off'}: clip fraction {np.mean(clip):.4f}, ratio max - min "
              f"{np.mean(spread):.3f}, reward {np.mean(reward[:10]):.3f} -> {np.mean(reward[-10:]):.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
