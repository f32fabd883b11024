"""Run configs (ml-collections): tiny (the default), small_moe, v2_lite, v3_671b."""

from __future__ import annotations

import os

from deepseek_jax.train.start import STAGES, model_config, validate

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "tiny.py")
__all__ = ["DEFAULT_CONFIG", "STAGES", "model_config", "validate"]
