"""Inference: the latent KV cache, sampling, and generation with MTP speculative decoding."""

from deepseek_jax.infer.cache import Cache, cache_bytes_per_token, init_cache, mha_cache_bytes_per_token
from deepseek_jax.infer.decode import Completion, complete, generate, stream
from deepseek_jax.infer.sampling import Sampling, probabilities, speculative_accept

__all__ = ["Cache", "Completion", "Sampling", "cache_bytes_per_token", "complete", "generate", "init_cache",
           "mha_cache_bytes_per_token", "probabilities", "speculative_accept", "stream"]
