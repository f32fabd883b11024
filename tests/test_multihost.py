"""Scale-out equivalence: 1 device, 8 devices on two meshes, and 2 processes agree on the losses;
a checkpoint written by 2 processes resumes in 1 process on another mesh."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_train import SMALL, losses

ARGS = {**SMALL, "steps": 6, "checkpoint_every": 3, "log_every": 1, "eval_every": 6}


def run(workdir, devices, processes=1, **overrides):
    """launch.train in `processes` processes with `devices` CPU devices each; waits for all."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    args = [sys.executable, "-m", "launch.train", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in (ARGS | overrides).items()]]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        args += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}"]
    procs = [subprocess.Popen(args + ([f"--process_id={i}"] if processes > 1 else []), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return losses(workdir)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    return run(tmp_path_factory.mktemp("one_device"), devices=1, **{"mesh.data": 1})


def assert_close(a, b, rtol=2e-3):
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=rtol)


@pytest.mark.parametrize("mesh", [dict(data=2, expert=2, tensor=2), dict(data=1, fsdp=8)])
def test_eight_devices_match_one(single_device, tmp_path, mesh):
    got = run(tmp_path, devices=8, **{f"mesh.{k}": v for k, v in mesh.items()})
    assert_close(got, single_device)


def test_two_processes_match_one_and_resume_elsewhere(single_device, tmp_path):
    # 2 processes x 4 devices, expert-parallel across the process boundary, stopped at step 3
    mesh = {"mesh.data": 2, "mesh.expert": 4}
    first = run(tmp_path, devices=4, processes=2, steps=3, **mesh)
    assert_close(first, single_device[:3])
    # the same workdir resumed by 1 process with 8 devices on an FSDP mesh (orbax reshards)
    resumed = run(tmp_path, devices=8, **{"mesh.data": 1, "mesh.fsdp": 8})
    assert_close(resumed, single_device)
