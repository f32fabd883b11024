#!/usr/bin/env bash
# The GPU checks, as one short script (H200: about 5 minutes).
#   1. the tiny config in float32 on CPU and on the accelerator: the logged losses must agree (rtol 2e-3);
#   2. configs/small_moe.py in bf16 for a few dozen steps: tokens/s and MFU against the chip's bf16 peak;
#   3. the MLA decode kernel (kernels_pallas/mla_decode.py): HBM GB/s next to plain XLA (on CPU: correctness only);
#   4. FP8: the block-scaled GEMM kernel (kernels_pallas/fp8_gemm.py) in TFLOP/s next to the bf16 dot on DeepGEMM's
#      shapes, and small_moe trained in FP8 and in bf16 for FP8_STEPS steps (default 100): the loss-gap curve;
#   5. flash attention (kernels_pallas/flash_attention.py): forward and forward+backward time and error next to the
#      XLA path at seq 4096, MLA head dims (192 / 128), bf16 (on CPU: correctness only);
#   6. DSA (benchmarks/dsa.py): V3.2 sparse vs V3 dense decode tokens/s and prefill time at 8k and 32k.
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]      (SUITE_STEPS=40 by default; PYTHON=python3;
#        SMALL_ARGS="--config.data.batch_size=2" shrinks check 2 for a CPU dry run;
#        MLA_ARGS="--batch 64 --context 4096" narrows check 3; FP8_GEMM_ARGS="--m 4096" and
#        FP8_TRAIN_ARGS="--batch_size 8" narrow check 4; FLASH_ARGS="--batch 1 --heads 8" narrows check 5;
#        DSA_ARGS="--contexts 8192 --skip_prefill" narrows check 6)
# On a machine without an accelerator both runs of check 1 use the CPU, which tests the script itself.
set -euo pipefail
OUT=${1:-${OUT:-/tmp/gpu_suite}}
PY=${PYTHON:-python3}
STEPS=${SUITE_STEPS:-40}
mkdir -p "$OUT"
export JAX_DEFAULT_MATMUL_PRECISION=highest  # f32 parity: no TF32 on the GPU side
TINY=(--config.steps=20 --config.log_every=5 --config.eval_every=20 --config.checkpoint_every=1000)

echo "== 1. tiny config: CPU vs $($PY -c 'import jax; print(jax.default_backend())')"
JAX_PLATFORMS=cpu $PY -m launch.train --workdir="$OUT/tiny_cpu" "${TINY[@]}" 2>"$OUT/tiny_cpu.log"
$PY -m launch.train --workdir="$OUT/tiny_accel" "${TINY[@]}" 2>"$OUT/tiny_accel.log"
$PY - "$OUT" <<'PY'
import json, sys
import numpy as np
out = sys.argv[1]
a, b = ([json.loads(l) for l in open(f"{out}/{d}/metrics.jsonl")] for d in ("tiny_cpu", "tiny_accel"))
la, lb = np.array([m["loss"] for m in a]), np.array([m["loss"] for m in b])
rel = float(np.max(np.abs(la - lb) / np.abs(la)))
print(f"losses cpu {np.round(la, 4).tolist()}\n       accel {np.round(lb, 4).tolist()}\nmax rel diff {rel:.2e}")
print("PARITY", "OK" if rel < 2e-3 else "FAILED")
PY

echo "== 2. small_moe (bf16), $STEPS steps"
unset JAX_DEFAULT_MATMUL_PRECISION
$PY -m launch.train --config=configs/small_moe.py --workdir="$OUT/small_moe" --config.steps="$STEPS" \
  --config.log_every=10 --config.eval_every=100000 --config.checkpoint_every=100000 ${SMALL_ARGS:-} \
  2>"$OUT/small_moe.log"
$PY - "$OUT" <<'PY'
import json, sys
from deepseek_jax.metrics import peak_flops
out = sys.argv[1]
m = [json.loads(l) for l in open(f"{out}/small_moe/metrics.jsonl")][1:]  # the first interval holds the compile
peak, source = peak_flops()
tps = sum(x["tokens_per_s"] for x in m) / len(m)
mfu = sum(x["mfu"] for x in m) / len(m)
print(f"small_moe: {tps:,.0f} tokens/s, MFU {100 * mfu:.1f}% of {peak / 1e12:.3g} TFLOP/s ({source}), "
      f"loss {m[0]['loss']:.3f} -> {m[-1]['loss']:.3f}")
json.dump({"tokens_per_s": tps, "mfu": mfu, "peak_flops": peak}, open(f"{out}/small_moe.json", "w"))
PY

echo "== 3. MLA decode kernel: HBM bandwidth vs plain XLA"
$PY benchmarks/mla_decode.py ${MLA_ARGS:-} | tee "$OUT/mla_decode.log"
tail -n 1 "$OUT/mla_decode.log" > "$OUT/mla_decode.json"

FP8_STEPS=${FP8_STEPS:-100}
echo "== 4. FP8: block-scaled GEMM kernel vs the bf16 dot; small_moe in FP8 vs bf16, $FP8_STEPS steps"
$PY benchmarks/fp8_gemm.py --grouped ${FP8_GEMM_ARGS:-} | tee "$OUT/fp8_gemm.log"
tail -n 1 "$OUT/fp8_gemm.log" > "$OUT/fp8_gemm.json"
$PY benchmarks/fp8_train.py --steps "$FP8_STEPS" --log_every 10 --out "$OUT/fp8_train" ${FP8_TRAIN_ARGS:-} \
  2>"$OUT/fp8_train.err" | tee "$OUT/fp8_train.log"
tail -n 1 "$OUT/fp8_train.log" > "$OUT/fp8_train.json"

echo "== 5. flash attention: time and error vs the XLA path at seq 4096"
$PY benchmarks/flash_attention.py ${FLASH_ARGS:-} | tee "$OUT/flash_attention.log"
tail -n 1 "$OUT/flash_attention.log" > "$OUT/flash_attention.json"

echo "== 6. DSA (V3.2): sparse vs dense decode and prefill at 8k and 32k, the indexer's share, FP8 top-k agreement"
$PY benchmarks/dsa.py ${DSA_ARGS:-} | tee "$OUT/dsa.log"
tail -n 1 "$OUT/dsa.log" > "$OUT/dsa.json"
