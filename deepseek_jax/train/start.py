"""Where a run starts: its model config, tokenizer and initial params, from `init_from` (a training workdir, a
HuggingFace directory, or an orbax params directory) or from the config itself; and the run files it leaves.

Fine-tuning a workdir or a HF checkpoint takes that model's architecture and tokenizer (config.model then only sets
the runtime fields: dtype, remat, ...). The DSA stages add config.model's indexer (index_n_heads, index_head_dim,
index_topk) to a model that has none, freshly initialized: V3.2 was made that way from V3.1. Every run writes
config.json (with the model it really trains) and its tokenizer (tokenizer.model, or tokenizer.json +
tokenizer_config.json), so launch.generate, a later stage and launch.convert_hf can load the workdir on its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from deepseek_jax.checkpoint import CheckpointError, abstract_like, is_run, restore_params, run_model_config
from deepseek_jax.config import RUNTIME_FIELDS, ConfigError, ModelConfig
from deepseek_jax.data import HFTokenizer, load_or_train_tokenizer, run_tokenizer, source_documents

STAGES = ("pretrain", "sft", "grpo", "dsa_warmup", "dsa_sparse")
DSA_STAGES = ("dsa_warmup", "dsa_sparse")
INDEXER_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """ModelConfig from config.model; an unknown key is an error naming it."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(config.model.keys()) - fields)
    if unknown:
        raise ConfigError(f"config.model has unknown keys {unknown}; valid keys: {sorted(fields)}")
    return ModelConfig(**config.model.to_dict())


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
    """Everything that can be checked before any compile."""
    if config.stage not in STAGES:
        raise ConfigError(f"config.stage={config.stage!r}: choose one of {STAGES}")
    for key in ("steps", "log_every", "checkpoint_every", "eval_every", "grad_accum"):
        if config[key] < 1:
            raise ConfigError(f"config.{key}={config[key]} must be >= 1")
    if config.data.batch_size % (config.grad_accum * jax.process_count()):
        raise ConfigError(f"config.data.batch_size={config.data.batch_size} must divide by grad_accum="
                          f"{config.grad_accum} x {jax.process_count()} processes")
    if config.stage == "sft" and config.data.source == "default":
        raise ConfigError("stage=sft needs data.source: jsonl files with prompt/response (or messages) fields")
    return model_config(config)


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(path))


def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[ModelConfig, Any]:
    """Validate, settle the model config and tokenizer, and write config.json and the tokenizer to `workdir`."""
    cfg = validate(config)
    source = os.path.abspath(config.init_from) if config.init_from else ""
    runtime = {f: getattr(cfg, f) for f in RUNTIME_FIELDS}
    if source and is_run(source):
        cfg, tokenizer = run_model_config(source).replace(**runtime), run_tokenizer(source)
    elif source and is_hf_dir(source):
        cfg, tokenizer = ModelConfig.from_hf(source, **runtime), HFTokenizer.from_dir(source)
    else:
        if source and not os.path.isdir(source):
            raise CheckpointError(f"init_from={source} does not exist")
        docs = None if config.data.source == "default" or config.stage == "sft" else (
            lambda: source_documents(config.data.source))  # a tokenizer of the run's own text
        tokenizer = load_or_train_tokenizer(config.data.tokenizer or None, cfg.vocab_size, documents_fn=docs)
    if config.stage in DSA_STAGES:
        if not cfg.dsa:  # V3 -> V3.2: a fresh indexer of config.model's shape
            cfg = cfg.replace(**{f: config.model[f] for f in INDEXER_FIELDS})
        if not cfg.dsa:
            raise ConfigError(f"stage={config.stage} trains DeepSeek Sparse Attention, but the model has no indexer "
                              "(index_n_heads=0): set model.index_n_heads (and index_head_dim, index_topk), or "
                              "init_from a V3.2 run or checkpoint")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than model.vocab_size="
                          f"{cfg.vocab_size}")
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        resolved = config.to_dict() | {"model": dataclasses.asdict(cfg)}
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=1, default=str)
        save_tokenizer(tokenizer, workdir)
    return cfg, tokenizer


def save_tokenizer(tokenizer: Any, workdir: str) -> None:
    if isinstance(tokenizer, HFTokenizer):
        for name in HF_TOKENIZER_FILES:
            if tokenizer.path and os.path.exists(os.path.join(tokenizer.path, name)):
                shutil.copy(os.path.join(tokenizer.path, name), workdir)
    else:
        tokenizer.save(os.path.join(workdir, "tokenizer.model"))


def initial_params(path: str, like: Any) -> Any:
    """Params from a training workdir (its latest checkpoint), a HF directory or an orbax params directory,
    placed like `like`. A source without DSA indexers (V3) leaves `like`'s own indexer params in place (`like`
    then holds real arrays: a fresh init)."""
    from deepseek_jax.hf import load_hf_checkpoint

    path = os.path.abspath(path)
    source_cfg = run_model_config(path) if is_run(path) else ModelConfig.from_hf(path) if is_hf_dir(path) else None
    flat = traverse_util.flatten_dict(like)
    keep = {k: v for k, v in flat.items() if "indexer" in k} if source_cfg is not None and not source_cfg.dsa else {}
    like_src = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in keep})
    if is_run(path):
        params = restore_params(os.path.join(path, "checkpoints"), like_src)[1]
    elif is_hf_dir(path):
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, like_src)
        params = load_hf_checkpoint(path, dtype=jax.tree_util.tree_leaves(like)[0].dtype, shardings=shardings)[1]
    else:
        params_dir = os.path.join(path, "params") if os.path.isdir(os.path.join(path, "params")) else path
        if not os.path.isdir(params_dir):
            raise CheckpointError(f"init_from={path} does not exist")
        params = ocp.StandardCheckpointer().restore(params_dir, abstract_like(like_src))
    return traverse_util.unflatten_dict(traverse_util.flatten_dict(params) | keep)
