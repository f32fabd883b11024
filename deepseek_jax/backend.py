"""Which implementation each "auto" setting runs, by the platform the program is compiled for.

One table for every knob with an "auto" (the config's moe_impl, attention_impl and decode_attention, and the FP8
GEMM), and one rule for the platform: the one `compiling_for` names (an AOT compile for a TPU slice from a CPU
host), else this process's backend ("gpu_fp8" for CUDA GPUs with FP8 tensor cores, compute capability 8.9 and up).
Pallas kernels pick their body when they are lowered instead (kernels_pallas.KERNEL_BODIES, by_platform), so they
follow whatever platform XLA lowers for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

AUTO = {  # knob: {platform: what "auto" runs}; "gpu_fp8" falls back to "gpu"
    "moe_impl": {"tpu": "ragged", "gpu": "ragged", "cpu": "tiled"},  # ragged_dot (+ ragged all-to-all); tiles
    "attention_impl": {"tpu": "pallas", "gpu": "pallas", "cpu": "xla"},  # the flash kernel; jnp query blocks
    "decode_attention": {"tpu": "pallas", "gpu": "pallas", "cpu": "absorb"},  # kernels_pallas.mla_decode; jnp
    "fp8_gemm": {"tpu": "xla", "gpu": "xla", "gpu_fp8": "pallas", "cpu": "xla"},  # kernels_pallas.fp8_gemm; XLA
}
CHOICES = {"moe_impl": ("ragged", "tiled"), "attention_impl": ("pallas", "xla"),
           "decode_attention": ("pallas", "absorb", "naive"), "fp8_gemm": ("pallas", "xla")}

_targets: list[str] = []


def platform() -> str:
    """The platform programs are being built for: "tpu", "gpu_fp8", "gpu" or "cpu"."""
    if _targets:
        return _targets[-1]
    backend = jax.default_backend()
    if backend != "gpu":
        return "tpu" if backend == "tpu" else "cpu"
    cc = str(getattr(jax.devices()[0], "compute_capability", "")).split(".")  # CUDA: "9.0"
    fp8 = len(cc) == 2 and all(p.isdigit() for p in cc) and (int(cc[0]), int(cc[1])) >= (8, 9)
    return "gpu_fp8" if fp8 else "gpu"


def resolve(knob: str, choice: str = "auto") -> str:
    """`choice` for `knob`, with "auto" looked up for the current platform; a bad choice names the valid ones."""
    if choice != "auto":
        if choice not in CHOICES[knob]:
            raise ValueError(f"{knob}={choice!r}: choose auto or one of {', '.join(CHOICES[knob])}")
        return choice
    table, where = AUTO[knob], platform()
    return table.get(where, table[where.split("_")[0]])


@contextlib.contextmanager
def compiling_for(target: str) -> Iterator[None]:
    """Resolve "auto" for `target` ("tpu", "gpu_fp8", "gpu", "cpu") inside the block, e.g. while lowering for TPU
    chips that this host does not have."""
    if target not in ("tpu", "gpu_fp8", "gpu", "cpu"):
        raise ValueError(f"compiling_for({target!r}): choose tpu, gpu_fp8, gpu or cpu")
    _targets.append(target)
    try:
        yield
    finally:
        _targets.pop()
