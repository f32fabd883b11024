"""R1: GRPO (advantages, loss), rule-based rewards, verifiable tasks; rollouts and the trainer in their modules."""

from deepseek_jax.rl import rewards, tasks
from deepseek_jax.rl.grpo import LOSS_AGGREGATIONS, group_advantages, grpo_loss
from deepseek_jax.rl.rewards import REWARDS
from deepseek_jax.rl.tasks import TASKS, make_task

__all__ = ["LOSS_AGGREGATIONS", "REWARDS", "TASKS", "group_advantages", "grpo_loss", "make_task", "rewards", "tasks"]
