"""Shared timing for the benchmark scripts (run as `python benchmarks/<name>.py`, so this imports as `timing`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable, *args, reps: int = 5, warmup: int = 2) -> float:
    """Median wall seconds of fn(*args) over `reps` calls (outputs ready), after `warmup` untimed calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
