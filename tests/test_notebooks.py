"""The notebooks run top to bottom (as CI executes them), in their shorter settings (DSJ_NOTEBOOK_FAST=1)."""

import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


@pytest.fixture(autouse=True)
def fast_notebooks(monkeypatch):
    monkeypatch.setenv("DSJ_NOTEBOOK_FAST", "1")  # the kernels inherit the environment


def test_train_tiny_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel sees one CPU device, as a user's would
    nb = nbformat.read(os.path.join(NOTEBOOKS, "01_train_tiny_deepseek.ipynb"), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "DeepSeek-V3 671B: MLA    70,272 B/token   MHA   4,997,120 B/token   98.6% smaller" in text
    first, last = (float(x) for x in text.split("loss ")[1].split(",")[0].split(" -> "))
    assert last < first - 1.0


def test_inference_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("DSJ_RUN", raising=False)
    nb = nbformat.read(os.path.join(NOTEBOOKS, "02_inference_mla_mtp.ipynb"), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "v3_671b: MLA    70,272 B/token   MHA   4,997,120 B/token   98.6% smaller" in text
    assert "same tokens: True" in text
    rate = float(text.split("acceptance rate ")[1].split("%")[0])
    assert rate > 20.0, rate  # the trained MTP module's drafts are often right
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))


def test_r1_zero_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(os.path.join(NOTEBOOKS, "03_r1_zero_countdown.ipynb"), as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "0 1  \"<think> </think> <answer> __import__" in text  # a hostile answer scores 0, no exception
    first, last = (float(x) for x in re.findall(r"reward (\S+) -> (\S+);", text)[-1])
    assert np.isfinite(first) and np.isfinite(last)
    assert "student SFT loss" in text and "'kept':" in text
    student = float(re.findall(r"student (\d+\.\d+)", text)[-1])
    assert student > 0.5, student  # the student learned the teacher's format from the kept samples alone


def test_fp8_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(os.path.join(NOTEBOOKS, "04_fp8_training.ipynb"), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    row = text.split("\n    100000   ")[1].split("\n")[0].split()  # outliers 1e5 x the ordinary channels
    per_tensor, per_token, tile, ue8m0 = (float(v.rstrip("%")) for v in row)
    assert per_tensor > 5 * tile and per_token > 2 * tile and tile <= ue8m0, row
    for name in ("Fprop", "Dgrad", "Wgrad"):
        err = float(text.split(name)[1].split("float32 ")[1].split("%")[0])
        assert 0.5 < err < 6.0, (name, err)
    assert float(text.split("max relative difference ")[1].split()[0]) < 1e-5
    for name in ("float32", "FP8"):  # the tiny config in FP8 and in float32, same steps and data: both learn,
        first, last = (float(x) for x in re.findall(rf"{name}: loss (\S+) -> (\S+),", text)[0])
        assert last < first - 1.0, (name, first, last)
    end = float(text.split("relative loss gap: end ")[1].split("%")[0])
    assert 0 < end < 1.0, end  # FP8 really ran (the losses differ), within 1% of float32 (V3: under 0.25% at scale)
    assert sum(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", [])) == 2


def test_sparse_attention_notebook_runs(tmp_path, monkeypatch):
    # one device; XLA's backend optimization off, as in the suite: four short stages compile more than they run
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    nb = nbformat.read(os.path.join(NOTEBOOKS, "05_sparse_attention.ipynb"), as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    before, after = (float(x) for x in re.findall(r"captured mass (\S+) \(fresh indexer\) -> (\S+);", text)[0])
    assert after > before + 0.05, (before, after)  # the warm-up teaches the indexer where attention goes
    fresh, trained = (np.array([float(v) for v in re.findall(r"k=\d+: (\S+)", line)])
                      for line in text.splitlines() if line.startswith(("fresh indexer", "after warm-up")))
    assert (np.diff(fresh) > 0).all() and (np.diff(trained) > 0).all() and (trained > fresh).all()
    sparse, dense = (float(x) for x in re.findall(r"sparse (\S+), dense (\S+) \(", text)[0])
    assert abs(sparse - dense) / dense < 0.05, (sparse, dense)
    assert sum(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", [])) == 3
