"""Supervised fine-tuning data (R1's cold start, rejection-sampled SFT, distillation): prompt/response pairs.

A `.jsonl` source holds one example per line: {"prompt": ..., "response": ...}, or {"messages": [...]} whose
last message is the assistant's response and whose earlier ones are rendered with the tokenizer's chat template
(with the generation prompt) as the prompt. Each example becomes one row: prompt ids, response ids, EOS, padded
to seq_len (segment id 0 on padding); `target_mask` marks the response tokens and the EOS, the only tokens the
loss predicts. Examples too long for a row are cut at seq_len (counted); ones whose prompt alone fills the row are
skipped. Example i is held out for eval iff i % EVAL_EVERY == 0, as in pretraining; train shuffles per epoch.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import grain
import numpy as np

from deepseek_jax.data.errors import DataError
from deepseek_jax.data.pipeline import EVAL_EVERY, DataIterator, _EvalDoc, _Rows, _TrainDoc
from deepseek_jax.data.sources import DataStats, resolve_files

THINK_OPEN = "<think>"  # R1's reasoning tag; a prompt that ends with it opens the reply


def read_examples(source: str) -> list[dict[str, Any]]:
    """Every usable example of the jsonl files of `source`; bad lines are skipped with one warning per file."""
    files = [f for f in resolve_files(source) if f.endswith(".jsonl")]
    if not files:
        raise DataError(f"SFT data source {source!r} has no .jsonl files; give prompt/response or messages jsonl")
    examples = []
    for path in files:
        bad = 0
        with open(path, "rb") as f:
            for raw in f:
                try:
                    ex = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    bad += 1
                    continue
                ok = isinstance(ex, dict) and (
                    (isinstance(ex.get("prompt"), str) and isinstance(ex.get("response"), str))
                    or (isinstance(ex.get("messages"), list) and len(ex["messages"]) >= 2
                        and ex["messages"][-1].get("role") == "assistant"))
                if ok:
                    examples.append(ex)
                elif raw.strip():
                    bad += 1
        if bad:
            warnings.warn(f"{path}: skipped {bad} lines that are not UTF-8 JSON objects with prompt/response "
                          "strings or messages ending with an assistant turn", stacklevel=2)
    if not examples:
        raise DataError(f"SFT data source {source!r} holds no usable examples")
    return examples


def encode_example(example: dict[str, Any], tokenizer: Any, chat: bool = False) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS). Messages go through the chat template, and so does a plain prompt when
    `chat` (as a user turn); otherwise it is encoded as the rollouts encode it."""
    if "messages" in example:
        if not hasattr(tokenizer, "apply_chat_template"):
            raise DataError("SFT examples with `messages` need a chat template: fine-tune from a HuggingFace "
                            "checkpoint (init_from=HF dir), or use prompt/response fields")
        prompt = tokenizer.encode(tokenizer.apply_chat_template(example["messages"][:-1]))
        response = example["messages"][-1]["content"]
    else:
        prompt, response = encode_prompt(tokenizer, example["prompt"], 1 << 30, chat), example["response"]
    return prompt, [*tokenizer.encode(response), tokenizer.eos_id]


class _Row:
    def __init__(self, examples: list[dict], tokenizer: Any, seq_len: int, stats: DataStats, chat: bool):
        self.examples, self.tokenizer, self.seq_len, self.stats, self.chat = examples, tokenizer, seq_len, stats, chat

    def __call__(self, index: int) -> dict[str, np.ndarray] | None:
        prompt, response = encode_example(self.examples[index], self.tokenizer, self.chat)
        if len(prompt) >= self.seq_len:
            self.stats.add(empty_docs_skipped=1)
            return None
        ids = (prompt + response)[:self.seq_len]
        n = len(ids)
        row = {k: np.zeros((self.seq_len,), np.int32) for k in ("tokens", "segment_ids", "positions", "target_mask")}
        row["tokens"][:n] = ids
        row["tokens"][n:] = max(getattr(self.tokenizer, "pad_id", 0), 0)
        row["segment_ids"][:n] = 1
        row["positions"][:n] = np.arange(n)
        row["target_mask"][len(prompt):n] = 1
        self.stats.add(docs_read=1)
        return row


def make_sft_iterator(source: str, tokenizer: Any, *, seq_len: int, global_batch_size: int, seed: int,
                      split: str = "train", process_index: int = 0, process_count: int = 1,
                      chat: bool = False) -> DataIterator:
    """Batches of {"tokens", "segment_ids", "positions", "target_mask"} [rows, seq_len], resumable like pretraining."""
    examples = read_examples(source)
    stats = DataStats(docs_in_source=len(examples))
    n_eval = -(-len(examples) // EVAL_EVERY)
    if split == "train":
        if len(examples) - n_eval < 1:
            raise DataError(f"SFT source {source!r} has {len(examples)} examples; at least {EVAL_EVERY} are needed "
                            "(every {EVAL_EVERY}th is held out)")
        docs = grain.MapDataset.range(len(examples) - n_eval).map(_TrainDoc()).shuffle(seed)
    else:
        docs = grain.MapDataset.range(n_eval).map(_EvalDoc())
    rows = global_batch_size // process_count
    ds = (docs.repeat().map(_Row(examples, tokenizer, seq_len, stats, chat)).to_iter_dataset()
          .batch(global_batch_size, drop_remainder=True).map(_Rows(process_index * rows, (process_index + 1) * rows)))
    meta = dict(source=source, split=split, seed=seed, seq_len=seq_len, rows=rows, global_batch_size=global_batch_size,
                process_index=process_index, process_count=process_count, docs_in_source=len(examples), kind="sft")
    return DataIterator(ds, stats, meta)


def encode_prompt(tokenizer: Any, text: str, max_tokens: int, chat: bool = False) -> list[int]:
    """The prompt's ids, as launch.generate encodes them (HF tokenizers add their BOS). chat=True (a HF tokenizer
    with a chat template) sends the prompt as a user turn and opens the reply with the prompt's trailing <think>,
    as R1's template does. Longer than max_tokens is an error naming the fix."""
    if chat:
        if not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError("rl.chat needs a HF tokenizer with a chat template (init_from a HF checkpoint)")
        question = text.removesuffix(THINK_OPEN).rstrip()
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}])
                               + (THINK_OPEN if text.endswith(THINK_OPEN) else ""))
    elif hasattr(tokenizer, "apply_chat_template"):
        ids = tokenizer.encode(text, add_special_tokens=True)
    else:
        ids = tokenizer.encode(text)
    if len(ids) > max_tokens:
        raise ValueError(f"a prompt encodes to {len(ids)} tokens, more than rl.max_prompt_tokens={max_tokens}: "
                         f"raise it (prompt: {text[:80]!r}...)")
    return ids
