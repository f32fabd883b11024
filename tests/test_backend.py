"""deepseek_jax.backend: every "auto" knob resolves from one table, for this host or for the platform compiled for."""

import jax
import pytest

from deepseek_jax import backend
from deepseek_jax.layers.gmm import grouped_matmul


def test_auto_follows_the_platform_compiled_for():
    assert jax.default_backend() == "cpu" and backend.platform() == "cpu"
    cpu = {k: backend.resolve(k) for k in backend.AUTO}
    assert cpu == {"moe_impl": "tiled", "attention_impl": "xla", "decode_attention": "absorb", "fp8_gemm": "xla"}
    with backend.compiling_for("tpu"):
        assert [backend.resolve(k) for k in backend.AUTO] == ["ragged", "pallas", "pallas", "xla"]
        with backend.compiling_for("gpu_fp8"):  # nested: the innermost wins; gpu_fp8 falls back to gpu's row
            assert [backend.resolve(k) for k in backend.AUTO] == ["ragged", "pallas", "pallas", "pallas"]
        assert backend.platform() == "tpu"
    assert backend.platform() == "cpu"
    assert backend.resolve("moe_impl", "ragged") == "ragged"  # an explicit choice is kept


def test_bad_choices_name_the_valid_ones():
    with pytest.raises(ValueError, match="moe_impl='pallas': choose auto or one of ragged, tiled"):
        backend.resolve("moe_impl", "pallas")
    with pytest.raises(ValueError, match="choose tpu, gpu_fp8, gpu or cpu"):
        with backend.compiling_for("v5p"):
            pass
    x, w = jax.numpy.ones((4, 8)), jax.numpy.ones((2, 8, 3))
    with pytest.raises(ValueError, match="choose auto or one of ragged, tiled"):
        grouped_matmul(x, w, jax.numpy.array([2, 2]), impl="fast")
