"""ModelConfig: every DeepSeek-V2 / V2-Lite / V3 / R1 hyperparameter, with HF spellings.

Defaults are DeepSeek-V3 671B. `ModelConfig.from_hf` reads a HuggingFace config.json as
released (either `rope_scaling` with `type`, or `rope_parameters` with `rope_type`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "yarn")
ARCHITECTURES = {"DeepseekV32ForCausalLM": "deepseek_v32", "DeepseekV3ForCausalLM": "deepseek_v3",
                 "DeepseekV2ForCausalLM": "deepseek_v2"}
DSA_MODES = ("sparse", "dense")
# Our own runtime choices; never read from (or written to) a HF config.json.
RUNTIME_FIELDS = ("dtype", "remat", "moe_impl", "attention_chunk", "moe_chunk_tokens", "decode_attention", "fp8",
                  "fp8_scale_fmt", "attention_impl", "unroll_layers", "dsa_mode", "dsa_fp8_indexer", "index_key_block")
_ROPE_FIELDS = ("rope_type", "rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim")


class ConfigError(ValueError):
    """A hyperparameter is missing, mistyped or inconsistent; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA (V2 sec. 2.1)
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE (V3 sec. 2.1.2)
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 1e-4  # sequence-wise balance loss weight (V3 eq. 17-20)
    # MTP (V3 sec. 2.2)
    num_nextn_predict_layers: int = 1
    # DeepSeek Sparse Attention (V3.2): a lightning indexer per layer picks the index_topk keys each query attends
    # to; index_n_heads = 0 is dense MLA (V2 / V3)
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 2048
    # positions: RoPE on the decoupled dims, YaRN (V2 appendix B)
    rope_theta: float = 10000.0
    rope_type: str = "yarn"
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    # released-checkpoint quantization: block size of FP8 weights, None for bf16 checkpoints
    fp8_weight_block: tuple[int, int] | None = None
    # runtime choices (not in HF configs)
    dtype: str = "float32"  # compute dtype; params stay float32
    remat: str = "none"  # "none" | "full" | "dots" (rematerialization policy per block)
    attention_chunk: int = 1024  # queries per attention block, each rematerialized; 0 = all at once
    # training / prefill attention: "pallas" (kernels_pallas.flash_attention), "xla" (jnp, query blocks of
    # attention_chunk), or "auto": pallas on GPU/TPU, xla on CPU
    attention_impl: str = "auto"
    # runs of at most this many same-kind blocks are unrolled (straight-line code: no stacked residual copies, which
    # cost small models ~15% of a CPU step); longer runs stay one nn.scan loop so compile time does not grow with depth
    unroll_layers: int = 8
    moe_chunk_tokens: int = 0  # tokens per device per expert-parallel dispatch round; 0 = all at once
    moe_impl: str = "auto"  # "ragged": ragged_dot + ragged_all_to_all (TPU/GPU); "tiled": CPU; "auto": by backend
    # cached decoding: "pallas" (kernels_pallas.mla_decode), "absorb" (jnp, latent space), "naive" (decompressed
    # per-head K/V), or "auto": pallas on GPU/TPU, absorb on CPU
    decode_attention: str = "auto"
    # FP8 training (V3 sec. 3.3): linear layers and experts as FP8 GEMMs with 1x128 / 128x128 block scales; embedding,
    # head, router, norms and attention core stay high precision. Scales: "fp32" (amax / 448) or "ue8m0" (powers of 2)
    fp8: bool = False
    fp8_scale_fmt: str = "fp32"
    # DSA at run time: "sparse" attends to the indexer's top-k keys (V3.2); "dense" attends to every key while the
    # indexer only scores them (the warm-up stage, which trains the indexer to match the dense attention)
    dsa_mode: str = "sparse"
    # the released code's indexer: Hadamard-rotated q and k scored in FP8 (1x128 tiles), keys cached in FP8 + scales;
    # False scores in full precision, as transformers does
    dsa_fp8_indexer: bool = False
    index_key_block: int = 4096  # keys per block of the indexer's running top-k; 0 = all keys at once

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}: {msg}")

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            need(int(getattr(self, f)) > 0, f, "must be a positive integer")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
             "must be a positive integer, or None for a plain q projection")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "RoPE rotates pairs, so it must be even")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func", f"choose one of {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, "topk_method", f"choose one of {TOPK_METHODS}")
        need(self.rope_type in ROPE_TYPES, "rope_type", f"choose one of {ROPE_TYPES}")
        need(self.remat in ("none", "full", "dots"), "remat", "choose none, full or dots")
        need(self.moe_impl in ("auto", "ragged", "tiled"), "moe_impl", "choose auto, ragged or tiled")
        need(self.decode_attention in ("auto", "pallas", "absorb", "naive"), "decode_attention",
             "choose auto, pallas, absorb or naive")
        need(self.attention_impl in ("auto", "pallas", "xla"), "attention_impl", "choose auto, pallas or xla")
        need(self.unroll_layers >= 0, "unroll_layers", "must be >= 0 (0 = always a scan loop)")
        need(isinstance(self.fp8, bool), "fp8", "must be True or False")
        need(self.fp8_scale_fmt in ("fp32", "ue8m0"), "fp8_scale_fmt", "choose fp32 or ue8m0")
        need(self.attention_chunk >= 0 and self.moe_chunk_tokens >= 0, "attention_chunk",
             "attention_chunk and moe_chunk_tokens must be >= 0 (0 = no chunking)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must lie in [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.index_n_heads >= 0, "index_n_heads", "must be >= 0 (0 = dense attention, no indexer)")
        need(self.dsa_mode in DSA_MODES, "dsa_mode", f"choose one of {DSA_MODES}")
        need(self.index_key_block >= 0, "index_key_block", "must be >= 0 (0 = all keys in one block)")
        if self.index_n_heads:
            need(self.index_head_dim > self.qk_rope_head_dim, "index_head_dim",
                 f"must exceed qk_rope_head_dim={self.qk_rope_head_dim}: the indexer rotates its first "
                 f"qk_rope_head_dim dims and keeps the rest unrotated")
            need(self.index_topk >= 1, "index_topk", "must be >= 1 (keys each query attends to)")
            need(self.q_lora_rank is not None, "q_lora_rank",
                 "DSA's indexer reads the query latent c_Q, so set q_lora_rank (or index_n_heads=0)")
            need(not self.dsa_fp8_indexer or self.index_head_dim & (self.index_head_dim - 1) == 0,
                 "index_head_dim", "dsa_fp8_indexer's Hadamard rotation needs a power of two")
        need(not self.dsa_fp8_indexer or self.index_n_heads > 0, "dsa_fp8_indexer",
             "needs an indexer (index_n_heads > 0)")
        if self.n_routed_experts:
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"n_routed_experts={self.n_routed_experts} must be divisible by n_group")
            need(1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must lie in [1, n_group={self.n_group}]")
            reachable = self.topk_group * self.n_routed_experts // self.n_group
            if self.topk_method == "greedy":
                reachable = self.n_routed_experts
            need(1 <= self.num_experts_per_tok <= reachable, "num_experts_per_tok",
                 f"must lie in [1, {reachable}] (experts in the topk_group kept groups)")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")

    # ---- derived quantities -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def dsa(self) -> bool:
        """DeepSeek Sparse Attention: every layer has a lightning indexer."""
        return self.index_n_heads > 0

    @property
    def yarn(self) -> bool:
        return self.rope_type == "yarn" and self.rope_factor > 1.0

    @property
    def softmax_scale(self) -> float:
        """(d_nope + d_rope)^-1/2, times m^2 with m = 0.1 * mscale_all_dim * ln(factor) + 1 under YaRN."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn and self.mscale_all_dim:
            scale *= yarn_mscale(self.rope_factor, self.mscale_all_dim) ** 2
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def layer_segments(self) -> tuple[tuple[bool, int, int], ...]:
        """Runs of same-kind layers as (is_moe, first_layer, count); each run is one nn.scan."""
        segs: list[list] = []
        for i in range(self.num_hidden_layers):
            moe = self.is_moe_layer(i)
            if segs and segs[-1][0] == moe:
                segs[-1][2] += 1
            else:
                segs.append([moe, i, 1])
        return tuple(tuple(s) for s in segs)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- HuggingFace config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides: Any) -> ModelConfig:
        """Read a HF DeepSeek-V2/V3 config.json (a dict, a file, or a directory holding one)."""
        hf = _read_json(path_or_dict)
        arch = (hf.get("architectures") or [None])[0]
        model_type = ARCHITECTURES.get(arch) or hf.get("model_type")
        if model_type not in ARCHITECTURES.values():
            raise ConfigError(
                f"unsupported architecture {arch!r} (model_type {hf.get('model_type')!r}); "
                f"expected one of {sorted(ARCHITECTURES)}")
        names = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS) - set(_ROPE_FIELDS)
        kw = {k: v for k, v in hf.items() if k in names}
        kw["model_type"] = model_type
        if kw.get("n_routed_experts") is None:
            kw["n_routed_experts"] = 0
        for k in ("n_group", "topk_group", "n_shared_experts"):
            if kw.get(k) is None:
                kw[k] = 1 if k != "n_shared_experts" else 0
        if model_type == "deepseek_v32":  # transformers' DeepseekV32Config defaults
            kw.setdefault("index_n_heads", 64)
        if model_type == "deepseek_v2":  # V2 defaults that differ from V3
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("norm_topk_prob", False)
            kw.setdefault("num_nextn_predict_layers", 0)
            kw.setdefault("routed_scaling_factor", 1.0)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; use yarn or none")
        kw["rope_type"] = rope_type
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if rope_type == "yarn":
            kw["rope_factor"] = float(rope["factor"])
            for k in ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                if rope.get(k) is not None:
                    kw[k] = rope[k]
        else:
            kw["rope_factor"] = 1.0
        quant = hf.get("quantization_config")
        if quant:
            if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(f"quantization_config {quant} is not supported; only fp8 e4m3 blocks")
            kw["fp8_weight_block"] = tuple(quant.get("weight_block_size", (128, 128)))
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The config.json that `hf.export_hf_checkpoint` writes."""
        model_type = self.model_type
        if self.dsa or model_type == "deepseek_v32":  # the indexer decides: V3.2 with one, V3 without
            model_type = "deepseek_v32" if self.dsa else "deepseek_v3"
        arch = {v: k for k, v in ARCHITECTURES.items()}[model_type]
        skip = {*RUNTIME_FIELDS, *_ROPE_FIELDS, "fp8_weight_block"}
        if not self.dsa:
            skip |= {"index_n_heads", "index_head_dim", "index_topk"}
        out = {k: v for k, v in self.to_dict().items() if k not in skip}
        out["architectures"], out["model_type"] = [arch], model_type
        out["num_key_value_heads"] = self.num_attention_heads  # MLA: every head reads the shared latent
        out["rope_scaling"] = None if self.rope_type == "default" else {
            "type": "yarn", "factor": self.rope_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
            "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim}
        if self.fp8_weight_block:
            out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": list(self.fp8_weight_block)}
        return out


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature m = 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _read_json(path_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no HF config at {path}: pass a config.json or the checkpoint directory")
    with open(path) as f:
        return json.load(f)
