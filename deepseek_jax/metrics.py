"""Parameter counts, model FLOPs, MFU, and a metrics log (JSON lines + TensorBoard events).

Counting conventions
  params:  every array in the param tree (norm scales and the routing bias included). `activated`
           counts what one token reads: all of it except the embedding table (a lookup, not a
           matmul), the unchosen routed experts, and nothing twice (the head is shared with MTP).
  FLOPs:   model FLOPs as in MFU (PaLM, Chowdhery et al. 2022 app. B): 2 per multiply-accumulate of
           the matmuls only (no norms, softmax, RoPE, routing top-k, or rematerialisation), forward
           = 2 * MACs, training = 3 * forward (backward = 2 * forward).

TensorBoard events are written with tensorboardX (no TensorFlow): its `Event` protos in its TFRecord
framing, one record a write, flushed and fsynced each time.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import RecordWriter

from deepseek_jax.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------


def _attention_params(cfg: ModelConfig) -> int:
    """MLA weights: q_a + q_a_norm + q_b (or q), kv_a + kv_a_norm, wkv_b, o."""
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
    else:
        q = d * heads * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + heads * cfg.v_head_dim * d


def _ffn_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(all, activated per token) FFN weights: SwiGLU = 3 * d * f; MoE = router (+ bias) + shared + experts."""
    d = cfg.hidden_size
    if not moe:
        dense = 3 * d * cfg.intermediate_size
        return dense, dense
    expert = 3 * d * cfg.moe_intermediate_size
    router = d * cfg.n_routed_experts + (cfg.n_routed_experts if cfg.topk_method == "noaux_tc" else 0)
    shared = cfg.n_shared_experts * expert
    return (router + shared + cfg.n_routed_experts * expert,
            router + shared + cfg.num_experts_per_tok * expert)


def _block_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(all, activated) of one block: 2 RMSNorms + MLA + FFN."""
    ffn_all, ffn_act = _ffn_params(cfg, moe)
    shared = 2 * cfg.hidden_size + _attention_params(cfg)
    return shared + ffn_all, shared + ffn_act


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of DeepSeekV3(cfg).

    Keys: `embedding`, `head` (0 when tied), `main` (the main model, embedding and head included),
    `mtp` (the MTP modules' own weights; embedding and head are shared), `total` = main + mtp (the
    size of the param tree), `main_activated` / `mtp_activated` / `activated` (per token, embedding
    excluded, top-k routed experts only), and `mtp_checkpoint` = mtp + one embedding and head copy
    per module, as the released HF checkpoints store them.
    """
    d, vocab = cfg.hidden_size, cfg.vocab_size
    embedding = vocab * d
    head = 0 if cfg.tie_word_embeddings else vocab * d
    blocks = [_block_params(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)]
    main = embedding + sum(b[0] for b in blocks) + d + head
    main_act = sum(b[1] for b in blocks) + d + vocab * d  # final norm and the head matmul (tied or not)
    mtp_block_all, mtp_block_act = _block_params(cfg, cfg.is_moe_layer(cfg.num_hidden_layers))
    mtp_extra = 3 * d + 2 * d * d  # enorm, hnorm, final norm, eh_proj [2d -> d]
    n_mtp = cfg.num_nextn_predict_layers
    mtp, mtp_act = n_mtp * (mtp_extra + mtp_block_all), n_mtp * (mtp_extra + mtp_block_act)
    return {
        "embedding": embedding, "head": head, "main": main, "mtp": mtp, "total": main + mtp,
        "main_activated": main_act, "mtp_activated": mtp_act, "activated": main_act + mtp_act,
        "mtp_checkpoint": mtp + n_mtp * 2 * vocab * d,
    }


# ---------------------------------------------------------------------------------------------
# model FLOPs
# ---------------------------------------------------------------------------------------------


def _attention_macs(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(projections, core) MACs per token of one MLA layer.

    projections: q_a + q_b (or q), kv_a, wkv_b (k_nope and v decompressed once per token), o.
    core: QK^T over qk_head_dim plus PV over v_head_dim for each head against seq_len / 2 keys, the
    mean context of a causal mask (the masked half is not counted; (seq_len + 1) / 2 exactly).
    """
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        q = d * cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
    else:
        q = d * heads * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv += cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    proj = q + kv + heads * cfg.v_head_dim * d
    core = heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return float(proj), float(core)


def _ffn_macs(cfg: ModelConfig, moe: bool) -> dict[str, float]:
    d = cfg.hidden_size
    if not moe:
        return {"dense_mlp": 3.0 * d * cfg.intermediate_size}
    expert = 3.0 * d * cfg.moe_intermediate_size
    return {"router": float(d * cfg.n_routed_experts), "shared_experts": cfg.n_shared_experts * expert,
            "routed_experts": cfg.num_experts_per_tok * expert}


def flops_breakdown(cfg: ModelConfig, seq_len: int, *, mtp: bool = True) -> dict[str, float]:
    """Forward matmul FLOPs per token (2 * MACs) by component; MTP modules under `mtp_*` keys."""
    out: dict[str, float] = {}

    def add(prefix: str, moe: bool) -> None:
        proj, core = _attention_macs(cfg, seq_len)
        parts = {"attn_proj": proj, "attn_core": core, **_ffn_macs(cfg, moe)}
        for k, v in parts.items():
            out[prefix + k] = out.get(prefix + k, 0.0) + 2.0 * v

    for i in range(cfg.num_hidden_layers):
        add("", cfg.is_moe_layer(i))
    out["head"] = 2.0 * cfg.hidden_size * cfg.vocab_size
    if mtp and cfg.num_nextn_predict_layers:
        for _ in range(cfg.num_nextn_predict_layers):
            add("mtp_", cfg.is_moe_layer(cfg.num_hidden_layers))
        n = cfg.num_nextn_predict_layers
        out["mtp_eh_proj"] = n * 2.0 * 2 * cfg.hidden_size * cfg.hidden_size
        out["mtp_head"] = n * out["head"]
    return out


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True, mtp: bool = True) -> float:
    """Model FLOPs per token: forward = 2 * matmul MACs (top-k routed experts only, causal attention
    at mean context seq_len / 2); training = 3 * forward."""
    fwd = sum(flops_breakdown(cfg, seq_len, mtp=mtp).values())
    return 3.0 * fwd if training else fwd


# ---------------------------------------------------------------------------------------------
# peak FLOP/s and MFU
# ---------------------------------------------------------------------------------------------

# Dense (non-sparse) bf16 peak per JAX device, from the vendors' data sheets. Matched on the
# lower-cased device_kind: TPU kinds exactly, GPU kinds by substring, first hit wins.
TPU_PEAK_BF16 = {
    "tpu v2": 22.5e12,  # 45 TFLOP/s per chip, one JAX device per TensorCore (2 per chip)
    "tpu v3": 61.5e12,  # 123 per chip, 2 TensorCores
    "tpu v4": 275e12,
    "tpu v4 lite": 137.5e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e, Trillium
    "tpu v6e": 918e12,
}
GPU_PEAK_BF16 = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM, also "NVIDIA H100 80GB HBM3"
    ("h800", 989e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("h20", 148e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("b200", 2250e12),
    ("l40s", 362e12),
    ("a10g", 70e12),
    ("v100", 125e12),  # fp16 tensor cores; no bf16
)
_MEASURED: dict[tuple[str, int], float] = {}


def _lookup_peak(kind: str) -> float | None:
    kind = kind.lower().strip()
    if kind in TPU_PEAK_BF16:
        return TPU_PEAK_BF16[kind]
    for name, peak in GPU_PEAK_BF16:
        if name in kind:
            return peak
    return None


def measure_matmul_flops(device: Any = None, *, n: int = 1024, reps: int = 5,
                         dtype: Any = jnp.float32) -> float:
    """Achieved FLOP/s of a jitted n x n matmul (2 n^3 FLOPs) on `device`, best of `reps` after warm-up."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), device)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def peak_flops(device: Any = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from).

    Known accelerators: the data-sheet dense bf16 peak by `device_kind`. CPU: a measured float32
    matmul, cached per process (on a host with simulated devices they all share its cores).
    Unknown accelerators: a measured bf16 matmul, also cached.
    """
    device = device or jax.local_devices()[0]
    kind = str(getattr(device, "device_kind", ""))
    platform = str(getattr(device, "platform", "cpu")).lower()
    if platform != "cpu":
        peak = _lookup_peak(kind)
        if peak is not None:
            return peak, f"{kind} bf16 dense data sheet"
    dtype, source = (jnp.float32, "measured f32 matmul") if platform == "cpu" else \
        (jnp.bfloat16, "measured bf16 matmul")
    key = (platform, int(getattr(device, "id", 0)) if platform != "cpu" else 0)
    if key not in _MEASURED:
        _MEASURED[key] = measure_matmul_flops(device, dtype=dtype)
    return _MEASURED[key], source


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float) -> float:
    """Model FLOPs utilisation = tokens/s * FLOPs/token / (n_devices * peak FLOP/s per device)."""
    return tokens_per_s * flops_per_token / (n_devices * peak)


# ---------------------------------------------------------------------------------------------
# metrics writer
# ---------------------------------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"
_EVENT_COUNTER = [0]


def _complete_lines(path: str) -> tuple[list[str], bool]:
    """Lines of `path` that end in a newline, and whether a partial last line was dropped."""
    if not os.path.exists(path):
        return [], False
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    partial = bool(lines) and not lines[-1].endswith("\n")
    return (lines[:-1] if partial else lines), partial


def _atomic_write(path: str, lines: list[str]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of workdir/metrics.jsonl in order; a partial last line (a killed run) is skipped."""
    lines, _ = _complete_lines(os.path.join(os.fspath(workdir), METRICS_FILE))
    records = []
    for line in lines:
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsWriter:
    """Per-step scalars to workdir/metrics.jsonl (one JSON object a line, flushed each write) and to a
    TensorBoard event file workdir/tb/events.out.tfevents.<time>.<host>.<pid>.<n>.

    Call it from one process (`enabled` defaults to jax.process_index() == 0; elsewhere it is a
    no-op). On resume from a checkpoint at step s, call `truncate_after(s)` before writing. Each
    event file opens with a SessionLog START at its first step, so TensorBoard shows a resumed run
    once: the events of earlier files at steps >= that step are purged.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool | None = None):
        self.workdir = os.fspath(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self.event_path: str | None = None
        self._jsonl = self._events = None
        self._session_started = False
        if not self.enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        lines, partial = _complete_lines(self.path)
        if partial:  # a run killed mid-line: drop the fragment so appends start on a fresh line
            _atomic_write(self.path, lines)
        self._jsonl = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            tb = os.path.join(self.workdir, "tb")
            os.makedirs(tb, exist_ok=True)
            _EVENT_COUNTER[0] += 1  # zero-padded: TensorBoard reads a directory's files in name order
            stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{_EVENT_COUNTER[0]:04d}"
            self.event_path = os.path.join(tb, f"events.out.tfevents.{stamp}")
            self._events = RecordWriter(self.event_path)
            self._event(0, file_version="brain.Event:2")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Append {"step": step, **metrics} (values as floats) and one TensorBoard event; flush both."""
        if not self.enabled:
            return
        if self._jsonl is None:
            raise ValueError(f"MetricsWriter({self.workdir!r}) is closed")
        values = {str(k): float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._events is not None and values:
            if not self._session_started:
                self._start_session(int(step))
            self._event(int(step), summary=Summary(value=[Summary.Value(tag=k, simple_value=v)
                                                          for k, v in values.items()]))

    def _event(self, step: int, **fields: Any) -> None:
        """One `Event` record, flushed and fsynced: a killed run keeps every event already written."""
        self._events.write(Event(wall_time=time.time(), step=step, **fields).SerializeToString())
        self._events.flush()

    def _start_session(self, step: int) -> None:
        """SessionLog START at `step`: TensorBoard drops the events of earlier files at steps >= `step`
        (its server-side reader ignores the first START it sees, so every file opens with one)."""
        self._event(step, session_log=SessionLog(status=SessionLog.START))
        self._session_started = True

    def truncate_after(self, step: int) -> None:
        """Resume at `step`: drop metrics.jsonl records with step > `step` (atomic rewrite), and log a
        SessionLog START at step + 1 so TensorBoard purges the stale events of earlier files."""
        if not self.enabled:
            return
        if self._jsonl is None:
            raise ValueError(f"MetricsWriter({self.workdir!r}) is closed")
        self._jsonl.close()
        lines, _ = _complete_lines(self.path)
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(record.get("step", -1)) <= step:
                kept.append(line)
        _atomic_write(self.path, kept)
        self._jsonl = open(self.path, "a", encoding="utf-8")
        if self._events is not None:
            self._start_session(int(step) + 1)

    def flush(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.close()
        self._jsonl = self._events = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
