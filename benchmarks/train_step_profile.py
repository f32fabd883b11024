"""Where a CPU training step's time goes: benchmarks/train_step.py's step, traced, summed per model part.

Traces a few steps with jax.profiler (XLA:CPU's per-op trace events on: --xla_cpu_enable_xprof_traceme), maps
every executed HLO op to the model code that emitted it (its op_name metadata, e.g. .../layers_1/mlp/experts/...)
and prints the thread time per step of each part, forward and backward apart. Thread time sums both cores, so the
parts add up to about cores_busy x the step time. "layer plumbing" is what holds no model part: the scan's
stacked residual buffers (zero fills, dynamic-update-slices and slices) and loop bookkeeping.

  python benchmarks/train_step_profile.py [--steps 3]

The last line printed is one JSON object {part: thread ms per step}.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax
from jax.profiler import ProfileData

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step

PARTS = ("attn", "mlp/experts", "mlp/shared", "mlp/gate", "mlp", "embed", "head", "norm")


def part_of(op_name: str) -> str:
    """'forward <part>' / 'backward <part>' from an op's op_name metadata."""
    phase = "backward" if "transpose(" in op_name else "forward"
    if "layers_0/mlp" in op_name:
        return f"{phase} dense mlp"
    part = next((p for p in PARTS if f"/{p}/" in op_name or op_name.endswith(f"/{p}")), None)
    if part is None:
        return f"{phase} {'loss' if 'forward' not in op_name else 'layer plumbing'}"
    return f"{phase} {part.replace('mlp/', '')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    step, _ = train_step.jax_train_step(train_step.jax_config(), args.batch, args.seq)
    step()
    hlo = getattr(step, "hlo_text", "")
    out_dir = tempfile.mkdtemp(prefix="train_step_trace_")
    with jax.profiler.trace(out_dir):
        for _ in range(args.steps):
            step()
    trace = ProfileData.from_file(glob.glob(f"{out_dir}/**/*.xplane.pb", recursive=True)[0])
    op_names = dict(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo, re.M))
    parts: collections.Counter = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            if "XLAEigen" not in line.name and "PjRt" not in line.name:
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool")):
                    continue
                parts[part_of(op_names.get(event.name, ""))] += event.duration_ns / 1e6 / args.steps
    total = sum(parts.values())
    print(f"thread ms per step, {args.batch} x {args.seq} tokens (both cores summed): total {total:.0f}")
    for name, ms in parts.most_common():
        print(f"  {name:28s} {ms:8.1f}  {100 * ms / total:5.1f}%")
    print(json.dumps({k: round(v, 2) for k, v in parts.items()} | {"total": round(total, 2)}))


if __name__ == "__main__":
    main()
