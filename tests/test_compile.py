"""launch.compile: the AOT path on this machine's devices (and on a TPU topology where libtpu exists)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from launch.compile import topology_devices

SMALL = ["--config.model.num_hidden_layers=2", "--config.data.batch_size=8", "--config.data.seq_len=64",
         "--config.mesh.data=2", "--config.mesh.expert=4"]


def compile_cli(topology, extra=()):
    out = subprocess.run([sys.executable, "-m", "launch.compile", f"--topology={topology}", *SMALL, *extra],
                         capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


def test_compile_on_cpu_devices_reports_memory_and_flops():
    r, text = compile_cli("cpu")
    assert r["devices"] == 8 and r["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert r["per_device_bytes"] == r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"] + r["temp_bytes"] > 0
    # XLA's count covers the model's matmuls (6N + attention) plus routing, padding and the optimizer
    assert 0.9 < r["xla_flops_per_step"] / r["flops_per_step"] < 3.0
    assert "per device: arguments" in text


def test_bad_topology_is_named():
    with pytest.raises(ValueError, match="v5p-7"):
        topology_devices("v5p-7")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (extra [tpu])")
def test_compile_for_v5p_lowers_ragged_dispatch():
    r, text = compile_cli("v5p-8", ["--config.mesh.data=1"])
    assert r["devices"] == 4 and "fits in 95.74 GiB per chip: yes" in text
