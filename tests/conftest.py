"""Every test sees 8 simulated CPU devices and full-precision f32 matmuls."""

import os
import tempfile

# Tests compile far more than they run: XLA's CPU backend optimization off cuts a compile by ~40% (the suite's
# numbers are unchanged; launched runs inherit it, the notebooks' kernels do not).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
                                   + ([] if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")
                                      else ["--xla_backend_optimization_level=0"])).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session's processes (xdist workers and launched runs):
# the same train step is compiled by several tests.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "deepseek_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

from deepseek_jax.config import ModelConfig  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def tiny_config(**kw) -> ModelConfig:
    """A V3-shaped model small enough for unit tests: 3 layers (1 dense, 2 MoE) and one MTP module."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
                num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, rope_factor=4.0,
                original_max_position_embeddings=8, max_position_embeddings=64, initializer_range=0.1)
    return ModelConfig(**(base | kw))


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


def _code_mappings() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


def _mapping_cap() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


MAPPING_BUDGET = _mapping_cap() // 2


@pytest.fixture(autouse=True)
def bounded_code_mappings():
    """XLA:CPU keeps each compiled program's code in hundreds of memory mappings (~660 for a serving-engine step)
    for as long as jax's caches hold the executable, and Linux caps a process at vm.max_map_count (65530): past it
    the next compile aborts the process. An xdist worker compiles thousands of programs, so after a test that
    leaves it past half the cap it drops jax's caches (later tests recompile, from the persistent cache)."""
    yield
    if _code_mappings() > MAPPING_BUDGET:
        jax.clear_caches()


def assert_trees_close(got, want, tol: float = 1e-5) -> None:
    """Every leaf within tol of the reference, relative to that leaf's largest magnitude (sums of many f32 terms
    round differently in different programs; an element-wise rtol fails on the near-zero elements)."""
    errors = jax.tree_util.tree_map(lambda a, b: float(abs(a - b).max() / (abs(b).max() + 1e-12)), got, want)
    assert max(jax.tree_util.tree_leaves(errors)) < tol, errors
