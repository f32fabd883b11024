"""launch.convert_hf: HF -> orbax -> HF keeps every tensor."""

import os

import numpy as np
from conftest import FIXTURES

from deepseek_jax.safetensors_io import SafetensorsFile
from launch import convert_hf


def test_cli_round_trip(tmp_path):
    src = os.path.join(FIXTURES, "v2_softmax_greedy")
    convert_hf.main(["--hf_dir", src, "--out", str(tmp_path / "orbax"), "--dtype", "float32"])
    convert_hf.main(["--to_hf", "--params", str(tmp_path / "orbax"), "--out", str(tmp_path / "hf"),
                     "--dtype", "float32"])
    a, b = SafetensorsFile(os.path.join(src, "model.safetensors")), SafetensorsFile(tmp_path / "hf/model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)
