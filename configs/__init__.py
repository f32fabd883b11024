"""Run configs (ml-collections): tiny (the default), small_moe, v2_lite, v3_671b."""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from deepseek_jax.config import ConfigError, ModelConfig

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "tiny.py")
STAGES = ("pretrain",)


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
        raise ConfigError(f"config.stage={config.stage!r}: this launcher runs {STAGES}")
    for key in ("steps", "log_every", "checkpoint_every", "eval_every", "grad_accum"):
        if config[key] < 1:
            raise ConfigError(f"config.{key}={config[key]} must be >= 1")
    if config.data.batch_size % (config.grad_accum * jax.process_count()):
        raise ConfigError(f"config.data.batch_size={config.data.batch_size} must divide by grad_accum="
                          f"{config.grad_accum} x {jax.process_count()} processes")
    return model_config(config)
