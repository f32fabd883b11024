"""Param counts (tree size and the V3 release figures), model FLOPs by hand, peak FLOP/s and MFU,
and the metrics log: JSON lines, resume truncation, TensorBoard records read back by an
independent TFRecord reader (its own CRC-32C) and by TensorBoard's own event accumulator."""

import json
import math
import os
import struct
import types
import warnings

import jax
import pytest
from conftest import tiny_config
from tensorboardX.proto.event_pb2 import Event, SessionLog

from deepseek_jax.config import ModelConfig
from deepseek_jax.metrics import MetricsWriter, flops_per_token, mfu, param_counts, peak_flops, read_metrics
from deepseek_jax.model import abstract_params

# ---- parameter counts -------------------------------------------------------------------------


def _tree_size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("kw", [
    {}, dict(q_lora_rank=None), dict(tie_word_embeddings=True), dict(num_nextn_predict_layers=2, moe_layer_freq=2),
    dict(n_routed_experts=0), dict(topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1),
])
def test_param_counts_match_the_param_tree(kw):
    cfg = tiny_config(**kw)
    tree = abstract_params(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == _tree_size(tree)
    assert counts["mtp"] == _tree_size({k: v for k, v in tree.items() if k.startswith("mtp_")})
    assert counts["main"] == counts["total"] - counts["mtp"]


def test_activated_params_tiny_by_hand():
    cfg = tiny_config()  # d=64, vocab=128, 4 heads, q_lora 48, kv_lora 32, nope 16, rope 8, v 16
    attn = 64 * 48 + 48 + 48 * 4 * 24 + 64 * 40 + 32 + 32 * 4 * 32 + 4 * 16 * 64  # q_a, norm, q_b, kv_a, norm, wkv_b, o
    norms = 2 * 64
    dense = 3 * 64 * 128
    moe_active = 64 * 16 + 16 + 3 * 64 * 32 + 4 * 3 * 64 * 32  # router, bias, shared, 4 of 16 experts
    head = 64 * 128
    main = 3 * (attn + norms) + dense + 2 * moe_active + 64 + head  # layer 0 dense, layers 1-2 MoE
    mtp = 3 * 64 + 2 * 64 * 64 + attn + norms + moe_active  # enorm/hnorm/norm, eh_proj, MoE block
    counts = param_counts(cfg)
    assert counts["main_activated"] == main == 152272
    assert counts["mtp_activated"] == mtp
    assert counts["activated"] == main + mtp


def test_deepseek_v3_release_figures():
    """README_WEIGHTS.md of the V3 release: main model 671B, 36.7B activated; MTP 11.5B unique
    (embedding and head shared); HF total 685B = 671B main + 14B MTP as stored (with its own
    embed_tokens and shared_head copies). The paper: 671B total, 37B activated per token."""
    cfg = ModelConfig()
    assert cfg.num_hidden_layers == 61 and cfg.first_k_dense_replace == 3
    c = param_counts(cfg)
    assert c["main"] == pytest.approx(671.0e9, rel=1e-3)
    assert c["main_activated"] == pytest.approx(36.7e9, rel=5e-3)
    eh_proj = 2 * 7168 * 7168
    assert c["mtp"] - eh_proj == pytest.approx(11.5e9, rel=5e-3)
    assert c["embedding"] == c["head"] == 129280 * 7168  # the 0.9B each
    assert c["main"] + c["mtp_checkpoint"] == pytest.approx(684.5e9, rel=1e-3)  # "685B" on HF
    assert c["mtp_checkpoint"] == pytest.approx(13.5e9, rel=5e-3)  # "14B" = 685B - 671B


# ---- FLOPs --------------------------------------------------------------------------------------


def test_flops_tiny_by_hand():
    cfg = tiny_config()
    seq = 10
    # multiply-accumulates per token, written out from the layer shapes
    attn_proj = 64 * 48 + 48 * 4 * 24 + 64 * (32 + 8) + 32 * 4 * (16 + 16) + 4 * 16 * 64  # 18432
    attn_core = 4 * (24 + 16) * seq / 2  # QK^T and PV at mean causal context 5
    dense = 3 * 64 * 128
    moe = 64 * 16 + 3 * 64 * 32 + 4 * 3 * 64 * 32  # router, shared, top-4 routed
    head = 64 * 128
    main = 3 * (attn_proj + attn_core) + dense + 2 * moe + head
    mtp = 2 * 64 * 64 + attn_proj + attn_core + moe + head  # eh_proj, MoE block, shared head again
    assert attn_proj == 18432 and main == 153952 and mtp == 67360
    assert flops_per_token(cfg, seq, training=False, mtp=False) == 2 * main
    assert flops_per_token(cfg, seq, training=False) == 2 * (main + mtp)
    assert flops_per_token(cfg, seq) == 6 * (main + mtp) == 1327872
    assert flops_per_token(tiny_config(num_nextn_predict_layers=0), seq) == 6 * main
    # top-k experts only: all-expert compute would be 4x the routed term
    assert flops_per_token(tiny_config(num_experts_per_tok=8), seq, mtp=False) == 6 * (main + 2 * 4 * 3 * 64 * 32)


def test_flops_q_plain_and_dense_only():
    cfg = tiny_config(q_lora_rank=None, n_routed_experts=0, num_nextn_predict_layers=0)
    seq = 6
    per_layer = 64 * 4 * 24 + 64 * 40 + 32 * 4 * 32 + 4 * 16 * 64 + 4 * 40 * 3 + 3 * 64 * 128
    assert flops_per_token(cfg, seq, training=False) == 2 * (3 * per_layer + 64 * 128)


def test_deepseek_v3_flops_near_6n():
    """Training FLOPs of V3 at 4096: 6 * activated matmul params plus the attention core."""
    cfg = ModelConfig()
    c = param_counts(cfg)
    f = flops_per_token(cfg, 4096, mtp=False)
    core = 61 * 128 * (192 + 128) * 2048
    matmul_params = c["main_activated"] - 61 * (2 * 7168 + 1536 + 512) - 7168 - 58 * 256  # norms, bias
    assert f == pytest.approx(6 * (matmul_params + core), rel=1e-12)
    assert 240e9 < f < 260e9


# ---- peak and MFU --------------------------------------------------------------------------------


def test_peak_flops_table_and_cpu_measurement():
    fake = lambda kind, platform="gpu": types.SimpleNamespace(device_kind=kind, platform=platform, id=0)
    assert peak_flops(fake("NVIDIA H100 80GB HBM3"))[0] == 989e12
    assert peak_flops(fake("NVIDIA H100 PCIe"))[0] == 756e12
    assert peak_flops(fake("NVIDIA H200"))[0] == 989e12
    assert peak_flops(fake("NVIDIA A100-SXM4-80GB"))[0] == 312e12
    assert peak_flops(fake("TPU v4", "tpu"))[0] == 275e12
    assert peak_flops(fake("TPU v5 lite", "tpu"))[0] == 197e12
    assert peak_flops(fake("TPU v5", "tpu"))[0] == 459e12
    assert peak_flops(fake("TPU v6 lite", "tpu"))[0] == 918e12
    cpu = jax.devices("cpu")[0]
    peak, source = peak_flops(cpu)
    assert source == "measured f32 matmul" and 1e8 < peak < 1e14
    assert peak_flops(cpu) == (peak, source)  # cached: the same figure, not a second measurement


def test_mfu():
    assert mfu(1000.0, 6e9, 8, 1e12) == pytest.approx(0.75)


# ---- an independent TFRecord reader ---------------------------------------------------------------


def _crc32c_bitwise(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: reflected polynomial 0x82F63B78, init and final xor 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def test_reference_crc32c_vectors():
    assert _crc32c_bitwise(b"123456789") == 0xE3069283
    assert _crc32c_bitwise(b"") == 0
    # RFC 3720 appendix B.4
    assert _crc32c_bitwise(bytes(32)) == 0x8A9136AA
    assert _crc32c_bitwise(b"\xff" * 32) == 0x62A8AB43
    assert _crc32c_bitwise(bytes(range(32))) == 0x46DD794E
    assert _crc32c_bitwise(bytes(range(31, -1, -1))) == 0x113FDB5C


def _masked(data: bytes) -> int:
    c = _crc32c_bitwise(data)
    return ((c >> 15 | c << 17) + 0xA282EAD8) % 2 ** 32


def _records(path: str) -> list[bytes]:
    """TFRecord framing: uint64 length, masked crc of the length, data, masked crc of the data (little-endian)."""
    raw, pos, out = open(path, "rb").read(), 0, []
    while pos < len(raw):
        header = raw[pos:pos + 8]
        (length,), (hcrc,) = struct.unpack("<Q", header), struct.unpack("<I", raw[pos + 8:pos + 12])
        assert hcrc == _masked(header)
        data = raw[pos + 12:pos + 12 + length]
        (dcrc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
        assert dcrc == _masked(data)
        out.append(data)
        pos += 16 + length
    return out


def _events(path: str) -> list[Event]:
    return [Event.FromString(rec) for rec in _records(path)]


def _scalars(event: Event) -> dict[str, float]:
    return {v.tag: v.simple_value for v in event.summary.value}


def _started(event: Event) -> bool:
    return event.HasField("session_log") and event.session_log.status == SessionLog.START


# ---- the metrics writer -------------------------------------------------------------------------


def test_writer_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path)
    for step in range(1, 4):
        w.write(step, {"loss": 2.0 / step, "lr": 1e-3 * step, "tokens_per_s": step * 1000})
    w.write(2 ** 40 + 3, {"a/b": float("inf")})
    w.write(2 ** 40 + 4, {})  # nothing to plot: a jsonl line, no event
    w.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 2 ** 40 + 3, 2 ** 40 + 4]
    assert recs[1] == {"step": 2, "loss": 1.0, "lr": 2e-3, "tokens_per_s": 2000.0}
    assert all(isinstance(v, float) for r in recs for k, v in r.items() if k != "step")

    assert os.path.dirname(w.event_path) == str(tmp_path / "tb")
    assert os.path.basename(w.event_path).startswith("events.out.tfevents.")
    events = _events(w.event_path)
    assert events[0].file_version == "brain.Event:2" and not _scalars(events[0])
    assert events[1].step == 1 and _started(events[1]) and not _scalars(events[1])
    assert [e.step for e in events[2:]] == [1, 2, 3, 2 ** 40 + 3]
    for e, step in zip(events[2:5], (1, 2, 3), strict=True):
        assert set(_scalars(e)) == {"loss", "lr", "tokens_per_s"}
        assert _scalars(e)["loss"] == pytest.approx(2.0 / step, rel=1e-6)
        assert _scalars(e)["tokens_per_s"] == step * 1000
        assert e.wall_time > 1.6e9 and not _started(e)
    assert _scalars(events[5]) == {"a/b": float("inf")}


def test_each_line_is_on_disk_before_close(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write(7, {"loss": 1.25})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 7, "loss": 1.25}  # not closed yet
    assert _events(w.event_path)[-1].step == 7
    w.close()


def test_resume_truncates_and_repairs(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 11):
            w.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # a run killed mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 11))

    with MetricsWriter(tmp_path) as w:  # resumed from a checkpoint at step 6
        w.truncate_after(6)
        assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 7))
        for step in range(7, 9):
            w.write(step, {"loss": 100.0 + step})
        resumed_events = _events(w.event_path)
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in recs[-3:]] == [6.0, 107.0, 108.0]
    assert all(line.endswith("}") for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    # the new event file restarts at 7: a SessionLog START at step 7 makes TensorBoard purge steps >= 7
    assert [(e.step, _started(e), _scalars(e)) for e in resumed_events[1:]] == [
        (7, True, {}), (7, False, {"loss": 107.0}), (8, False, {"loss": 108.0})]
    assert len(os.listdir(tmp_path / "tb")) == 2
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_tensorboard_reader_shows_a_resumed_run_once(tmp_path):
    """TensorBoard's server-side accumulator over workdir/tb: the resumed file's START at step 7 purges
    steps >= 7 of the first file for every tag, also eval_loss, which the resumed run never rewrites."""
    with warnings.catch_warnings():  # tensorboard without TensorFlow warns on import
        warnings.simplefilter("ignore")
        from tensorboard.backend.event_processing import plugin_event_accumulator as tb_acc
        from tensorboard.util.tensor_util import make_ndarray
    with MetricsWriter(tmp_path) as w:  # a fresh run, as the train loop opens it
        w.truncate_after(0)
        for step in range(1, 11):
            w.write(step, {"loss": float(step)} | ({"eval_loss": 50.0 + step} if step in (5, 8) else {}))
    with MetricsWriter(tmp_path) as w:  # resumed from a checkpoint at step 6
        w.truncate_after(6)
        for step in range(7, 9):
            w.write(step, {"loss": 100.0 + step})

    acc = tb_acc.EventAccumulator(str(tmp_path / "tb"), size_guidance={tb_acc.TENSORS: 0})  # 0: keep all
    acc.Reload()
    series = {tag: [(e.step, make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
              for tag in ("loss", "eval_loss")}
    assert series == {"loss": [(s, float(s)) for s in range(1, 7)] + [(7, 107.0), (8, 108.0)],
                      "eval_loss": [(5, 55.0)]}


def test_writer_without_tensorboard(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.truncate_after(0)
        w.write(1, {"loss": 1.0})
    assert w.event_path is None and not (tmp_path / "tb").exists()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False)
    w.write(1, {"loss": 1.0})
    w.truncate_after(0)
    w.close()
    assert not (tmp_path / "run").exists() and read_metrics(tmp_path / "run") == []
