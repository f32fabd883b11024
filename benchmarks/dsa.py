"""DeepSeek Sparse Attention on this machine: decode and prefill, V3.2 sparse vs V3 dense on the same dims.

  python benchmarks/dsa.py [--contexts 8192 32768] [--new 16] [--index_heads 64 8] [--skip_prefill]

The model: V2-Lite's attention dims (16 heads, kv_lora 512, rope 64, nope 128, v 128; q_lora 1536, as DSA's
indexer reads the query latent), 2 layers with a small dense FFN (1024), no MoE and no MTP, so attention dominates;
the V3.2 variant adds an indexer of index_head_dim 128 keeping the top 2048 keys. Two indexer widths: V3.2's own 64
heads, and 8 (V3.2 has 64 index heads for 128 attention heads; 8 keeps that ratio for these 16).

1. Decode tokens/s at each context (batch 1, float32 cache; the compiled decode loop alone, after a prefill), and
   the indexer's share of a sparse step: its scoring and top-k over the cache timed alone at the same shapes.
2. Prefill seconds at each context (one compiled pass over the prompt, after compiling).
3. The FP8 indexer (dsa_fp8_indexer: Hadamard + E4M3 scoring, FP8 key cache): how often its top-2048 agrees with
   the full-precision selection, on the prompt's keys.
Ratios come from one run on a shared 2-core machine. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

import deepseek_jax as dsj
import deepseek_jax.infer.decode as engine
from deepseek_jax.infer import cache_bytes_per_token
from deepseek_jax.layers import indexer as dsa
from deepseek_jax.layers.indexer import Indexer
from deepseek_jax.layers.linear import Linear
from deepseek_jax.layers.norm import RMSNorm
from deepseek_jax.layers.rope import rope_cos_sin


def model(context: int, index_heads: int = 0, fp8: bool = False) -> dsj.ModelConfig:
    return dsj.ModelConfig(
        vocab_size=1024, hidden_size=2048, intermediate_size=1024, num_hidden_layers=2, first_k_dense_replace=2,
        n_routed_experts=0, num_attention_heads=16, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=0, rope_type="default", rope_factor=1.0,
        max_position_embeddings=context + 64, initializer_range=0.02, attention_chunk=1024,
        index_n_heads=index_heads, index_head_dim=128, index_topk=2048, index_key_block=8192, dsa_fp8_indexer=fp8)


def decode_rate(cfg, params, context: int, new: int, time_prefill: bool = True) -> tuple[float, float]:
    """(tokens/s of the decode loop alone at batch 1, prefill seconds, NaN unless time_prefill) with a prompt of
    `context - new` tokens."""
    prompts = np.asarray(jax.random.randint(jax.random.key(1), (1, context - new), 0, cfg.vocab_size))
    s, _, tokens, lengths = engine._prepare(cfg, prompts, new, 0.0, 1.0, None, False)
    key, decode, prefill = jax.random.key(0), [], []
    for _ in range(2):  # the first run compiles both programs; the second is timed
        start = time.perf_counter()
        state = jax.block_until_ready(engine._prefill(params, tokens, lengths, key, s))
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(engine._run(params, state, jnp.asarray(new, jnp.int32), s))
        decode.append(time.perf_counter() - start)
    return (new - 1) / decode[1], prefill[1] if time_prefill else float("nan")


def indexer_seconds(cfg, context: int) -> float:
    """One decode step's indexer work for all layers: score one query against `context` cached keys, top-k."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, cfg.index_n_heads, cfg.index_head_dim)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 1, cfg.index_n_heads)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((1, context, cfg.index_head_dim)), jnp.float32)
    pos, seg = jnp.full((1, 1), context - 1), jnp.zeros((1, 1), jnp.int32)
    f = jax.jit(functools.partial(dsa.select, topk=cfg.index_topk, key_block=cfg.index_key_block))
    return cfg.num_hidden_layers * median_seconds(
        lambda: f(q, w, keys, None, pos, seg, jnp.zeros((1, context), jnp.int32)), reps=7)


class QueryLatentIndexer(nn.Module):
    """MLA's query latent c_Q and the indexer on it, named as inside MLA (so an MLA's params apply)."""

    cfg: dsj.ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin):
        c_q = RMSNorm(1e-6, axis_name="q_lora", name="q_a_norm")(
            Linear(self.cfg.q_lora_rank, ("embed", "q_lora"), name="q_a")(x))
        return Indexer(self.cfg, name="indexer")(x, c_q, cos, sin)


def fp8_agreement(cfg, params, context: int, queries: int = 64) -> float:
    """Share of the full-precision top-k keys the FP8 indexer also selects, for the last `queries` queries of a
    random prompt, in the first layer (the same params: the Hadamard rotation leaves exact scores unchanged)."""
    tokens = jax.random.randint(jax.random.key(1), (1, context), 0, cfg.vocab_size)
    x = params["embed"]["embedding"][tokens]
    x = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)  # attn_norm at its init
    cos, sin = rope_cos_sin(cfg, jnp.arange(context)[None])
    attn = jax.tree_util.tree_map(lambda a: a[0], params["layers_0"]["attn"])
    pos = jnp.arange(context - queries, context)[None]
    selected = []
    for fp8 in (False, True):
        c = cfg.replace(dsa_fp8_indexer=fp8)
        idx = jax.jit(QueryLatentIndexer(c).apply)({"params": attn}, x, cos, sin)
        keys, scale = dsa.cached_keys(idx.k, fp8, jnp.float32)
        slots, _ = dsa.select(idx.q[:, -queries:], idx.w[:, -queries:], keys, scale, pos, jnp.zeros_like(pos),
                              jnp.zeros((1, context), jnp.int32), c.index_topk, c.index_key_block, fp8)
        selected.append(np.asarray(slots)[0])
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(*selected, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--new", type=int, default=16, help="tokens decoded per timed run")
    ap.add_argument("--index_heads", type=int, nargs="+", default=[64, 8])
    ap.add_argument("--skip_prefill", action="store_true", help="decode only (prefill at 32k takes minutes)")
    args = ap.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    v32 = dsj.ModelConfig(index_n_heads=64, model_type="deepseek_v32")
    result = {"cache_bytes_per_token_671b": {
        "v3": cache_bytes_per_token(dsj.ModelConfig(), jnp.bfloat16, mtp=False),
        "v32_bf16_index_keys": cache_bytes_per_token(v32, jnp.bfloat16, mtp=False),
        "v32_fp8_index_keys": cache_bytes_per_token(v32.replace(dsa_fp8_indexer=True), jnp.bfloat16, mtp=False)}}
    print("671B cache bytes per token (bf16, no MTP):", result["cache_bytes_per_token_671b"])
    for context in args.contexts:
        row = {}
        dense_cfg = model(context)
        rate, pre = decode_rate(dense_cfg, dsj.init_params(dense_cfg, jax.random.key(0)), context, args.new,
                                not args.skip_prefill)
        row["dense"] = {"decode_tokens_per_s": rate, "prefill_s": pre}
        print(f"context {context}: V3 dense   decode {rate:7.2f} tokens/s, prefill {pre:7.1f} s")
        for heads in args.index_heads:
            cfg = model(context, heads)
            rate, pre = decode_rate(cfg, dsj.init_params(cfg, jax.random.key(0)), context, args.new,
                                    not args.skip_prefill)
            share = indexer_seconds(cfg, context) * rate
            row[f"sparse_{heads}"] = {"decode_tokens_per_s": rate, "prefill_s": pre, "indexer_share": share,
                                      "decode_speedup": rate / row["dense"]["decode_tokens_per_s"],
                                      "prefill_speedup": row["dense"]["prefill_s"] / pre}
            print(f"context {context}: V3.2 sparse ({heads:2d} index heads) decode {rate:7.2f} tokens/s "
                  f"({rate / row['dense']['decode_tokens_per_s']:.2f}x dense; indexer {100 * share:.0f}% of a step), "
                  f"prefill {pre:7.1f} s ({row['dense']['prefill_s'] / pre:.2f}x)")
        cfg = model(context, args.index_heads[0])
        row["fp8_topk_agreement"] = fp8_agreement(cfg, dsj.init_params(cfg, jax.random.key(0)), context)
        print(f"context {context}: FP8 indexer selects {100 * row['fp8_topk_agreement']:.1f}% of the full-precision "
              "top-2048")
        result[context] = row
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
