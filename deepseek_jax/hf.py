"""HuggingFace DeepSeek-V2/V3 checkpoints <-> deepseek-jax params.

Every param leaf maps to HF tensors by one table: a per-layer name (stacked over the layers of
its nn.scan run, and over experts for routed experts) and the number of kernel input dims
(HF stores torch Linear weights as [out, in]; ours are [in..., out...]). Loading streams one
tensor at a time from memory-mapped safetensors into the leaf's final layout and sharding,
dequantizing FP8 E4M3 weights with their 128x128 `weight_scale_inv` blocks. Pickle-based
checkpoints are refused. The MTP module is `model.layers.{num_hidden_layers + k}`.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import math
import os
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from deepseek_jax import fp8
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import DeepSeekV3, abstract_params
from deepseek_jax.safetensors_io import SafetensorsFile, write

# param path inside a block -> (HF name inside `model.layers.{i}.`, kernel input dims; 0 = copied as is)
BLOCK = {
    ("attn_norm", "scale"): ("input_layernorm.weight", 0),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", 0),
    ("attn", "q_a", "kernel"): ("self_attn.q_a_proj.weight", 1),
    ("attn", "q_a_norm", "scale"): ("self_attn.q_a_layernorm.weight", 0),
    ("attn", "q_b", "kernel"): ("self_attn.q_b_proj.weight", 1),
    ("attn", "q", "kernel"): ("self_attn.q_proj.weight", 1),
    ("attn", "kv_a", "kernel"): ("self_attn.kv_a_proj_with_mqa.weight", 1),
    ("attn", "kv_a_norm", "scale"): ("self_attn.kv_a_layernorm.weight", 0),
    ("attn", "wkv_b"): ("self_attn.kv_b_proj.weight", 1),
    ("attn", "o", "kernel"): ("self_attn.o_proj.weight", 2),
    ("attn", "indexer", "wq_b", "kernel"): ("self_attn.indexer.wq_b.weight", 1),  # V3.2's lightning indexer
    ("attn", "indexer", "wk", "kernel"): ("self_attn.indexer.wk.weight", 1),
    ("attn", "indexer", "k_norm", "scale"): ("self_attn.indexer.k_norm.weight", 0),
    ("attn", "indexer", "k_norm", "bias"): ("self_attn.indexer.k_norm.bias", 0),
    ("attn", "indexer", "weights_proj", "kernel"): ("self_attn.indexer.weights_proj.weight", 1),
    ("mlp", "router", "gate", "kernel"): ("mlp.gate.weight", 1),
    ("mlp", "router", "e_score_correction_bias"): ("mlp.gate.e_score_correction_bias", 0),
    **{("mlp", p, "kernel"): (f"mlp.{p}_proj.weight", 1) for p in ("gate", "up", "down")},
    **{("mlp", "experts", p): (f"mlp.experts.{{expert}}.{p}_proj.weight", 1) for p in ("gate", "up", "down")},
    **{("mlp", "shared", p, "kernel"): (f"mlp.shared_experts.{p}_proj.weight", 1) for p in ("gate", "up", "down")},
}
TOP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", 0),
    ("norm", "scale"): ("model.norm.weight", 0),
    ("head", "kernel"): ("lm_head.weight", 1),
}
MTP = {
    ("enorm", "scale"): ("enorm.weight", 0),
    ("hnorm", "scale"): ("hnorm.weight", 0),
    ("eh_proj", "kernel"): ("eh_proj.weight", 1),
    ("norm", "scale"): ("shared_head.norm.weight", 0),
}
MTP_COPIES = {"embed_tokens.weight": ("embed", "embedding"), "shared_head.head.weight": ("head", "kernel")}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, mis-shaped or of an unsupported kind."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One param leaf and the HF tensors it is stacked from."""

    path: tuple[str, ...]
    template: str  # HF name, with {layer} and {expert} placeholders
    layers: tuple[int, ...] | None  # layer ids stacked on axis 0 (nn.scan runs)
    experts: int | None  # experts stacked on the next axis
    shape: tuple[int, ...]
    in_dims: int

    @property
    def stack(self) -> list[tuple[int, ...]]:
        return [ax for ax in (self.layers, tuple(range(self.experts)) if self.experts else None) if ax is not None]

    @property
    def base_shape(self) -> tuple[int, ...]:
        return self.shape[len(self.stack):]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        base = self.base_shape
        if not self.in_dims:
            return base
        return math.prod(base[self.in_dims:]), math.prod(base[:self.in_dims])

    @property
    def fp8_eligible(self) -> bool:
        """Decoder linear layers; embedding, head, router, norms, eh_proj and the indexer's head weights stay high
        precision (V3 3.3; V3.2 as released)."""
        return bool(self.in_dims) and self.template.startswith("model.layers.") and not any(
            name in self.template for name in (".mlp.gate.", "eh_proj", "weights_proj"))

    def name(self, ids: tuple[int, ...]) -> str:
        keys = (["layer"] if self.layers else []) + (["expert"] if self.experts else [])
        return self.template.format(**dict(zip(keys, ids, strict=True)))

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return w.T.reshape(self.base_shape) if self.in_dims else w

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(math.prod(self.base_shape[:self.in_dims]), -1).T if self.in_dims else w


def leaves(cfg: ModelConfig) -> list[Leaf]:
    """The HF mapping of every param leaf of DeepSeekV3(cfg)."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)))
    out = []
    for path, arr in flat.items():
        layers = None
        if path in TOP:
            template, in_dims = TOP[path]
        elif path[0].startswith("layers_"):
            _, start, count = cfg.layer_segments[int(path[0].split("_")[1])]
            layers = tuple(range(start, start + count))
            suffix, in_dims = BLOCK[path[1:]]
            template = "model.layers.{layer}." + suffix
        elif path[0].startswith("mtp_"):
            i = cfg.num_hidden_layers + int(path[0].split("_")[1])
            suffix, in_dims = BLOCK[path[2:]] if path[1] == "block" else MTP[path[1:]]
            template = f"model.layers.{i}." + suffix
        else:
            raise KeyError(f"no HF name for param {'/'.join(path)}")
        experts = cfg.n_routed_experts if "{expert}" in template else None
        out.append(Leaf(path, template, layers, experts, tuple(arr.shape), in_dims))
    return out


class _Checkpoint:
    """The tensors of a HF checkpoint directory, by name, without reading them."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint directory {path!r} does not exist")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            pickled = [p for p in os.listdir(path) if p.endswith(PICKLE_SUFFIXES)]
            hint = (f" It holds pickle files {pickled[:3]}, which are never loaded (they can run code): "
                    "convert them to safetensors first.") if pickled else ""
            raise CheckpointError(f"no *.safetensors files in {path!r}.{hint}")
        self.where: dict[str, SafetensorsFile] = {}
        for name in files:
            file_path = os.path.join(path, name)
            if not os.path.exists(file_path):
                raise CheckpointError(f"{index} lists {name!r}, which is missing from {path!r}")
            st = SafetensorsFile(file_path)
            self.where.update({k: st for k in st.keys()})

    def is_fp8(self, name: str) -> bool:
        return self.where[name].entries[name]["dtype"] == "F8_E4M3"

    def read(self, name: str, shape: tuple[int, ...], block: tuple[int, int], dequantize: bool = True) -> np.ndarray:
        """One tensor as float32, FP8 dequantized (w = q * s per block), checked against `shape`;
        dequantize=False returns FP8 codes as they are."""
        w = self.where[name].get(name)
        if tuple(w.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(w.shape)}, the config implies {tuple(shape)}")
        if w.dtype == ml_dtypes.float8_e4m3fn and not dequantize:
            return w
        if w.dtype == ml_dtypes.float8_e4m3fn:
            scale = name + "_scale_inv"
            if scale not in self.where:
                raise CheckpointError(f"FP8 tensor {name!r} has no {scale!r} beside it")
            return np.asarray(fp8.dequantize_weights(w, self.where[scale].get(scale), block))
        return w.astype(np.float32)


def load_hf_checkpoint(path: str | os.PathLike, dtype: Any = jnp.bfloat16, shardings: Any = None,
                       keep_fp8: bool = False, **overrides: Any) -> tuple[ModelConfig, Any]:
    """Directory with config.json + *.safetensors -> (ModelConfig, params in `dtype`).

    `shardings`, a pytree of jax.sharding.Sharding like the params, places each leaf directly in
    its sharding; each device reads only its slice. keep_fp8: FP8 weights stay E4M3 codes (half the
    memory of bf16), with their block scales beside them as `{name}_scale_inv` [..., in/128, out/128];
    the model dequantizes them as it runs. `overrides` go to ModelConfig.from_hf.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_hf(path, **overrides)
    ckpt = _Checkpoint(path)
    block = cfg.fp8_weight_block or (fp8.BLOCK, fp8.BLOCK)
    specs = leaves(cfg)
    mtp_prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers))
    has_mtp = any(n.startswith(mtp_prefixes) for n in ckpt.where) if mtp_prefixes else False

    expected, missing = set(), []
    for leaf in specs:
        if leaf.path[0].startswith("mtp_") and not has_mtp:
            continue
        for ids in itertools.product(*leaf.stack):
            name = leaf.name(ids)
            expected.update((name, name + "_scale_inv"))
            if name not in ckpt.where:
                missing.append(name)
    indexer_missing = sorted(n for n in missing if ".indexer." in n)
    if indexer_missing:
        raise CheckpointError(
            f"{path!r} is a DeepSeek-V3.2 config (index_n_heads={cfg.index_n_heads}) but {len(indexer_missing)} "
            f"indexer tensors are missing, e.g. {indexer_missing[:5]}; a V3 checkpoint has no indexer: load it with "
            "its V3 config.json, or start stage dsa_warmup from it (init_from) to add a fresh indexer")
    if missing:
        raise CheckpointError(f"{len(missing)} tensors the config needs are missing from {path!r}, e.g. "
                              f"{sorted(missing)[:5]}; check that config.json belongs to these weights")
    expected.update(p + c for p in mtp_prefixes for c in MTP_COPIES)
    unexpected = sorted(n for n in ckpt.where if n not in expected and not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} tensors in {path!r} have no place in the model, e.g. "
                              f"{unexpected[:5]}; the config.json may not match the weights")

    flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
    fresh = {}
    if mtp_prefixes and not has_mtp:
        warnings.warn(f"{path!r} has no MTP weights (model.layers.{cfg.num_hidden_layers}.*); "
                      "the MTP modules are initialized fresh", stacklevel=2)
        fresh = traverse_util.flatten_dict(jax.jit(lambda key: {
            k: v for k, v in nn.meta.unbox(DeepSeekV3(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]).items()
            if k.startswith("mtp_")})(jax.random.key(0)))

    def read(leaf: Leaf, index: tuple[slice, ...] | None = None, part: str = "value") -> np.ndarray:
        """The leaf (or its slice `index`): "value" in `dtype`, FP8 "codes", or their block "scales"."""
        index = index or tuple(slice(None) for _ in leaf.shape)
        n = len(leaf.stack)
        picks = [ids[index[a]] for a, ids in enumerate(leaf.stack)]
        out = None
        for pos in itertools.product(*(range(len(p)) for p in picks)):
            name = leaf.name(tuple(p[i] for p, i in zip(picks, pos, strict=True)))
            if part == "scales":  # HF's grid is [out/128, in/128]; ours follows the kernel, [in/128, out/128]
                w = ckpt.where[name + "_scale_inv"].get(name + "_scale_inv").T
            else:
                w = leaf.to_ours(ckpt.read(name, leaf.hf_shape, block, dequantize=part == "value"))[index[n:]]
            if out is None:
                out = np.empty(tuple(len(p) for p in picks) + w.shape, w.dtype if part != "value" else dtype)
            out[pos] = w
        return out

    def fp8_stored(leaf: Leaf) -> bool:
        return keep_fp8 and bool(leaf.in_dims) and ckpt.is_fp8(leaf.name(tuple(s[0] for s in leaf.stack)))

    params = {}
    for leaf in specs:
        part = "codes" if leaf.path not in fresh and fp8_stored(leaf) else "value"
        if leaf.path in fresh:
            params[leaf.path] = fresh[leaf.path].astype(dtype)
        elif leaf.path in flat_shardings:
            params[leaf.path] = jax.make_array_from_callback(
                leaf.shape, flat_shardings[leaf.path], lambda idx, leaf=leaf, part=part: read(leaf, idx, part))
        else:
            params[leaf.path] = jnp.asarray(read(leaf, part=part))
        if part == "codes":
            params[(*leaf.path[:-1], leaf.path[-1] + "_scale_inv")] = jnp.asarray(read(leaf, part="scales"))
    return cfg, traverse_util.unflatten_dict(params)


def export_hf_checkpoint(cfg: ModelConfig, params: Any, path: str | os.PathLike, dtype: Any = jnp.bfloat16,
                         fp8_weights: bool = False, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and sharded safetensors in the released DeepSeek layout.

    fp8_weights: store decoder linear weights as E4M3 with 128x128 `weight_scale_inv` blocks.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    flat = traverse_util.flatten_dict(params)
    if fp8_weights:
        cfg = cfg.replace(fp8_weight_block=(fp8.BLOCK, fp8.BLOCK))
    specs = {leaf.path: leaf for leaf in leaves(cfg)}
    entries = []  # (name, shape, dtype, produce)
    for leaf in specs.values():
        arr = flat[leaf.path]
        for ids in itertools.product(*(range(len(s)) for s in leaf.stack)):
            name = leaf.name(tuple(s[i] for s, i in zip(leaf.stack, ids, strict=True)))
            hf = (lambda arr=arr, ids=ids, leaf=leaf: leaf.to_hf(np.asarray(arr[ids], np.float32)))
            if fp8_weights and leaf.fp8_eligible:
                nb = tuple(-(-d // fp8.BLOCK) for d in leaf.hf_shape)
                entries.append((name, leaf.hf_shape, ml_dtypes.float8_e4m3fn,
                                lambda hf=hf: fp8.quantize_weights(hf())[0]))
                entries.append((name + "_scale_inv", nb, np.float32, lambda hf=hf: fp8.quantize_weights(hf())[1]))
            else:
                entries.append((name, leaf.hf_shape, dtype, hf))
    for k in range(cfg.num_nextn_predict_layers):
        for suffix, src in MTP_COPIES.items():
            leaf = specs[src]
            entries.append((f"model.layers.{cfg.num_hidden_layers + k}.{suffix}", leaf.hf_shape, dtype,
                            lambda leaf=leaf: leaf.to_hf(np.asarray(flat[leaf.path], np.float32))))

    shards, size = [[]], 0
    for e in entries:
        nbytes = math.prod(e[1]) * np.dtype(e[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        write(os.path.join(path, name), shard)
    if len(shards) > 1:
        weight_map = {e[0]: n for n, shard in zip(names, shards, strict=True) for e in shard}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    config = cfg.to_hf() | {"torch_dtype": jnp.dtype(dtype).name}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
