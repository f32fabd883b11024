"""deepseek-jax: DeepSeek-V3 / R1 in JAX."""

from deepseek_jax import fp8, infer, rl
from deepseek_jax.config import ConfigError, ModelConfig
from deepseek_jax.hf import export_hf_checkpoint, load_hf_checkpoint
from deepseek_jax.infer import generate
from deepseek_jax.model import DeepSeekV3, forward, init_params, logits

__all__ = ["ConfigError", "DeepSeekV3", "ModelConfig", "export_hf_checkpoint", "forward", "fp8", "generate", "infer",
           "init_params", "load_hf_checkpoint", "logits", "rl"]
