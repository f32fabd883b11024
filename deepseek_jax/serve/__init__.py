"""Serving: a continuous-batching engine over a paged latent cache with prefix caching (engine, pages), and the
OpenAI-compatible HTTP API on top of it (api)."""

from deepseek_jax.serve.engine import Engine, Request, SamplingParams
from deepseek_jax.serve.pages import PagePool, page_hashes

__all__ = ["Engine", "PagePool", "Request", "SamplingParams", "page_hashes"]
