"""Rejection sampling (R1 sec. 2.3.3): sample N completions per prompt, keep those the task rewards fully, and
write them as SFT examples ({"prompt", "response"} jsonl) for the next fine-tuning stage or a smaller student."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.rl.rollout import sample


def rejection_sample(cfg: ModelConfig, params: Any, tokenizer: Any, task: Any, problems: Sequence[Any], n: int, *,
                     key: jax.Array, max_prompt_tokens: int, max_new_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, stop: Sequence[str] = (), batch_prompts: int = 16,
                     threshold: float = 1.0, keep_on: Sequence[str] | None = None) -> tuple[list[dict], dict]:
    """Examples whose rewards named in `keep_on` (default: all of the task's) are all >= threshold, at most one per
    distinct completion of a prompt; and counts {"sampled", "kept", "prompts_solved", "solve_rate"}."""
    kept, sampled, solved = [], 0, 0
    for start in range(0, len(problems), batch_prompts):
        chunk = problems[start:start + batch_prompts]
        _, _, texts = sample(cfg, params, tokenizer, [p.prompt for p in chunk for _ in range(n)],
                             max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, key=jax.random.fold_in(key, start), stop=stop)
        sampled += len(texts)
        for i, problem in enumerate(chunk):
            good = {t for t in texts[i * n:(i + 1) * n] if _passes(task.score(problem, t), keep_on, threshold)}
            solved += bool(good)
            kept += [{"prompt": problem.prompt, "response": t} for t in sorted(good)]
    return kept, {"sampled": sampled, "kept": len(kept), "prompts_solved": solved,
                  "solve_rate": solved / max(len(problems), 1)}


def _passes(scores: dict[str, float], keep_on: Sequence[str] | None, threshold: float) -> bool:
    return all(scores[name] >= threshold for name in (keep_on or scores))


def write_jsonl(examples: Sequence[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


