"""CPU training-step throughput: deepseek-jax vs HuggingFace transformers (PyTorch), and MoE scaling.

Measures forward + backward (value_and_grad of the mean next-token cross-entropy; no optimizer
update) on a small DeepSeek-V3-style MoE in float32, on the same number of CPU threads for both:

  JAX:    jax.jit(jax.value_and_grad(loss)) over deepseek_jax.forward, compiled first, then
          `--steps` timed steps with block_until_ready; the median is reported.
  torch:  transformers.DeepseekV3ForCausalLM with the same dims, train mode,
          model(input_ids, labels=input_ids).loss.backward(); attention "sdpa" and "eager" and the
          experts implementations are all timed and the fastest counts.

The torch side runs in a subprocess with another interpreter (`--torch-python`, by default
/opt/hfref/bin/python when it exists), since torch and transformers are not installed next to JAX.
Without it the torch columns are skipped with a note.

MoE scaling: the same model with 64 vs 8 routed experts (top-4, n_group=1) and the time-per-token
ratio t(64)/t(8), for moe_impl="tiled" and moe_impl="ragged" (jax.lax.ragged_dot, which XLA:CPU
lowers to one dense product per expert, so its cost grows with the number of experts).

  python benchmarks/train_step.py            # full run, a few minutes on 2 cores
  python benchmarks/train_step.py --quick    # smoke run

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

DEFAULT_TORCH_PYTHON = "/opt/hfref/bin/python"
GOAL_SPEEDUP = 1.5  # JAX tokens/s over torch tokens/s: at least this
GOAL_SCALING = 1.5  # t(64 experts) / t(8 experts) per token: at most this

# The benchmark model: DeepSeek-V3 shape, scaled down. The dense FFN width is (top_k + shared) *
# moe_intermediate, the V3 ratio (18432 = 9 * 2048), so dense and MoE layers do similar work per token.
MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=1,
    topk_group=1,
    n_shared_experts=1,
    moe_intermediate_size=128,
    intermediate_size=(4 + 1) * 128,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    num_nextn_predict_layers=0,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
)
ROPE_THETA = 10000.0
SCALING_EXPERTS = (8, 64)


# ---------------------------------------------------------------------------------------------
# timing helpers (shared by both sides; plain python so the torch interpreter can run them)


def round_robin(steps: dict[str, Any], n: int) -> dict[str, tuple[list[float], list[float]]]:
    """Time n calls of each zero-argument step, interleaved so load drift hits all alike.

    Returns wall seconds and process CPU seconds (all threads) of every call."""
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in steps}
    for _ in range(n):
        for name, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            times[name][0].append(time.perf_counter() - t0)
            times[name][1].append(time.process_time() - c0)
    return times


def summary(times: tuple[list[float], list[float]], tokens: int) -> dict[str, float]:
    wall, cpu = times
    med = statistics.median(wall)
    return {"step_s": med, "min_s": min(wall), "tokens_per_s": tokens / med, "steps": len(wall),
            "cores_busy": statistics.median(cpu) / med}


# ---------------------------------------------------------------------------------------------
# torch side (runs under --torch-python via `--torch-worker SPEC`)


def torch_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    threads, batch, seq, steps = spec["threads"], spec["batch"], spec["seq"], spec["steps"]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokens = batch * seq

    def build(attn: str, experts: str, n_routed: int):
        kw = dict(MODEL, n_routed_experts=n_routed)
        cfg = transformers.DeepseekV3Config(
            **kw, num_key_value_heads=kw["num_attention_heads"], attention_bias=False, use_cache=False,
            rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, attn_implementation=attn, experts_implementation=experts, dtype=torch.float32)
        model.train()
        return model

    ids = torch.randint(0, MODEL["vocab_size"], (batch, seq))

    def make_step(model):
        def step():
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        return step

    def measure(variants: dict[str, tuple[str, str, int]], n: int) -> dict[str, dict[str, Any]]:
        fns, info = {}, {}
        for name, (attn, experts, n_routed) in variants.items():
            try:
                model = build(attn, experts, n_routed)
                fn = make_step(model)
                fn()  # warm-up (allocator, oneDNN primitive caches)
            except Exception as e:  # an experts backend may not exist on this torch build
                info[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
                continue
            fns[name] = fn
            info[name] = {"attn": model.config._attn_implementation,
                          "experts": model.config._experts_implementation, "n_routed_experts": n_routed}
        for name, ts in round_robin(fns, n).items():
            info[name].update(summary(ts, tokens))
        return info

    n_main = MODEL["n_routed_experts"]
    main = measure({f"sdpa/{e}": ("sdpa", e, n_main) for e in spec["experts_impls"]}, steps)
    ok = {k: v for k, v in main.items() if "step_s" in v}
    best_experts = min(ok.values(), key=lambda v: v["step_s"])["experts"] if ok else "eager"
    main.update(measure({f"eager/{best_experts}": ("eager", best_experts, n_main)}, steps))
    ok = {k: v for k, v in main.items() if "step_s" in v}
    best = min(ok, key=lambda k: ok[k]["step_s"]) if ok else None
    out: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "threads": torch.get_num_threads(), "variants": main, "best": best}
    if spec["scaling"] and best:
        attn, experts = ok[best]["attn"], ok[best]["experts"]
        sc = measure({f"E{e}": (attn, experts, e) for e in SCALING_EXPERTS}, spec["scaling_steps"])
        out["scaling"] = sc
    return out


def run_torch(python: str, spec: dict[str, Any], timeout: float) -> tuple[dict[str, Any] | None, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env.pop("PYTHONPATH", None)
    cmd = [python, os.path.abspath(__file__), "--torch-worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"torch subprocess timed out after {timeout:.0f}s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return None, f"torch subprocess failed (rc={proc.returncode}): " + " | ".join(tail)
    return json.loads(lines[-1]), ""


# ---------------------------------------------------------------------------------------------
# JAX side


def jax_config(**overrides: Any):
    import deepseek_jax as dsj

    kw = dict(MODEL, rope_type="default", rope_factor=1.0, rope_theta=ROPE_THETA)
    kw.update(overrides)
    return dsj.ModelConfig(**kw)


def jax_train_step(cfg, batch: int, seq: int):
    """A zero-argument callable running one compiled value_and_grad step, and its compile seconds."""
    import jax
    import jax.numpy as jnp

    import deepseek_jax as dsj

    params = dsj.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size, jnp.int32)

    def loss_fn(p, toks):
        logits = dsj.forward(cfg, p, toks[:, :-1]).logits  # [B, T, V] float32
        target = toks[:, 1:]
        picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0

    def step():
        jax.block_until_ready(compiled(params, tokens))

    step()  # first run: buffers, thread pools
    step.hlo_text = compiled.as_text()  # for benchmarks/train_step_profile.py: op names to model parts
    return step, compile_s


def measure_jax(variants: dict[str, Any], batch: int, seq: int, n: int) -> dict[str, dict[str, Any]]:
    fns, info = {}, {}
    for name, cfg in variants.items():
        fns[name], compile_s = jax_train_step(cfg, batch, seq)
        info[name] = {"compile_s": compile_s, "moe_impl": cfg.moe_impl, "n_routed_experts": cfg.n_routed_experts}
    for name, ts in round_robin(fns, n).items():
        info[name].update(summary(ts, batch * seq))
    return info


# ---------------------------------------------------------------------------------------------


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fmt_row(name: str, r: dict[str, Any]) -> str:
    if "step_s" not in r:
        return f"  {name:36s} {r.get('error', 'n/a')}"
    return (f"  {name:36s} {r['step_s'] * 1e3:9.1f} {r['min_s'] * 1e3:9.1f} {r['tokens_per_s']:10.0f}"
            f" {r['cores_busy']:6.2f}")


def wait_idle(max_wait: float, threads: int) -> None:
    """Wait (at most max_wait s) until the 1-minute load average drops below a quarter of the cores."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= 0.25 * threads and time.monotonic() < deadline:
        time.sleep(5)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 5; quick 2)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; quick 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; quick 64)")
    ap.add_argument("--quick", action="store_true", help="small batch and few steps: a smoke run")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both sides (pins this process to that many cores; default: all)")
    ap.add_argument("--torch-python", default=None,
                    help=f"interpreter with torch + transformers (default {DEFAULT_TORCH_PYTHON} if present)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    ap.add_argument("--no-scaling", action="store_true", help="skip the 8 vs 64 experts scaling runs")
    ap.add_argument("--scaling-steps", type=int, default=None,
                    help="timed steps per scaling variant (default: min(steps, 3))")
    ap.add_argument("--torch-experts", default="eager,grouped_mm",
                    help="transformers experts implementations to try (comma list; batched_mm is very slow on CPU)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long for the load average to drop (shared machines)")
    ap.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.torch_worker is not None:
        print(json.dumps(torch_worker(json.loads(args.torch_worker))), flush=True)
        return {}

    steps = args.steps or (2 if args.quick else 5)
    batch = args.batch or (2 if args.quick else 8)
    seq = args.seq or (64 if args.quick else 256)
    scaling_steps = args.scaling_steps or min(steps, 3)
    if args.threads:
        if not hasattr(os, "sched_setaffinity"):
            ap.error("--threads needs os.sched_setaffinity (Linux)")
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])  # before XLA starts its pool
    threads = cpu_threads()

    import jax

    if args.wait_idle > 0:
        wait_idle(args.wait_idle, threads)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    cfg = jax_config()
    tokens = batch * seq
    print(f"# deepseek-jax train step (fwd+bwd) on CPU: jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s)")
    print(f"# threads: XLA CPU pool {threads} (cores this process may use), torch set_num_threads({threads}); "
          f"load average {load0[0]:.2f}")
    print(f"# batch {batch} x seq {seq} = {tokens} tokens/step, float32, {steps} timed steps (median); "
          "cores = process CPU time / wall time per step")
    print("# model: " + ", ".join(f"{k}={v}" for k, v in MODEL.items()) + f", rope default theta={ROPE_THETA:g}")

    # ---- main comparison ----------------------------------------------------------------------
    try:
        from deepseek_jax.backend import resolve

        impl = resolve("moe_impl", cfg.moe_impl)
    except (ImportError, ValueError):
        impl = cfg.moe_impl
    jax_main = measure_jax({f"jax moe_impl={cfg.moe_impl}->{impl}": cfg}, batch, seq, steps)
    jax_name, jax_res = next(iter(jax_main.items()))

    torch_out, torch_note = None, ""
    torch_python = args.torch_python or (DEFAULT_TORCH_PYTHON if os.path.exists(DEFAULT_TORCH_PYTHON) else None)
    if args.no_torch:
        torch_note = "torch skipped (--no-torch)"
    elif not torch_python or not os.path.exists(torch_python):
        torch_note = (f"torch skipped: no interpreter at {torch_python or DEFAULT_TORCH_PYTHON} "
                      "(pass --torch-python PATH to a python with torch + transformers)")
    else:
        spec = dict(threads=threads, batch=batch, seq=seq, steps=steps, scaling=not args.no_scaling,
                    scaling_steps=scaling_steps, experts_impls=[e for e in args.torch_experts.split(",") if e])
        torch_out, torch_note = run_torch(torch_python, spec, timeout=900)

    print()
    print(f"  {'implementation':36s} {'median ms':>9s} {'min ms':>9s} {'tokens/s':>10s} {'cores':>6s}")
    print(fmt_row(jax_name, jax_res) + f"   (compile {jax_res['compile_s']:.1f}s)")
    speedup = None
    torch_best = None
    if torch_out:
        for name, r in torch_out["variants"].items():
            print(fmt_row(f"torch attn={name.split('/')[0]} experts={name.split('/')[1]}", r))
        if torch_out.get("best"):
            torch_best = torch_out["variants"][torch_out["best"]]
            speedup = jax_res["tokens_per_s"] / torch_best["tokens_per_s"]
        print(f"\n  torch {torch_out['torch']}, transformers {torch_out['transformers']}, "
              f"torch threads {torch_out['threads']}; fastest torch: {torch_out.get('best')}")
        if speedup is not None:
            ok = "OK" if speedup >= GOAL_SPEEDUP else "BELOW GOAL"
            print(f"  JAX / torch tokens/s: {speedup:.2f}x  (goal >= {GOAL_SPEEDUP}x: {ok})")
    else:
        print(f"\n  {torch_note}")

    # ---- MoE scaling ---------------------------------------------------------------------------
    scaling: dict[str, Any] = {}
    if not args.no_scaling:
        variants = {f"{impl_name} E={e}": cfg.replace(n_routed_experts=e, moe_impl=impl_name)
                    for impl_name in ("tiled", "ragged") for e in SCALING_EXPERTS}
        res = measure_jax(variants, batch, seq, scaling_steps)
        print(f"\n  MoE scaling, time per token with {SCALING_EXPERTS[1]} vs {SCALING_EXPERTS[0]} routed experts "
              f"(top-{cfg.num_experts_per_tok}, n_group=1), {scaling_steps} steps each:")
        print(f"  {'implementation':20s} {'t(8) ms':>9s} {'t(64) ms':>9s} {'ratio':>7s}")
        rows = [(f"jax {i}", res[f"{i} E={SCALING_EXPERTS[0]}"], res[f"{i} E={SCALING_EXPERTS[1]}"])
                for i in ("tiled", "ragged")]
        if torch_out and torch_out.get("scaling"):
            sc = torch_out["scaling"]
            a, b = sc[f"E{SCALING_EXPERTS[0]}"], sc[f"E{SCALING_EXPERTS[1]}"]
            if "step_s" in a and "step_s" in b:
                rows.append((f"torch {torch_out['best']}", a, b))
        for name, a, b in rows:
            ratio = b["step_s"] / a["step_s"]
            key = name.replace("jax ", "").replace("torch ", "torch:")
            scaling[key] = {"t8_ms": a["step_s"] * 1e3, "t64_ms": b["step_s"] * 1e3, "ratio": ratio,
                            "t8_us_per_token": a["step_s"] / tokens * 1e6,
                            "t64_us_per_token": b["step_s"] / tokens * 1e6}
            mark = "" if name.startswith("torch") else ("  OK" if ratio <= GOAL_SCALING else "  ABOVE GOAL")
            print(f"  {name:20s} {a['step_s'] * 1e3:9.1f} {b['step_s'] * 1e3:9.1f} {ratio:7.2f}{mark}")
        if args.quick:
            print("  (--quick: with so few rows per expert, padding to row tiles dominates; use full size)")
        print(f"  (goal: jax tiled ratio <= {GOAL_SCALING}; compile s: "
              + ", ".join(f"{k} {v['compile_s']:.1f}" for k, v in res.items()) + ")")

    load1 = os.getloadavg()
    wall = time.perf_counter() - t_start
    print(f"\n# wall {wall:.0f}s; load average start {load0[0]:.2f}, end {load1[0]:.2f} "
          f"(other processes on these cores skew every figure)")
    result = {
        "benchmark": "train_step",
        "config": dict(MODEL, rope_type="default", rope_theta=ROPE_THETA),
        "batch": batch, "seq": seq, "tokens_per_step": tokens, "steps": steps, "dtype": "float32",
        "threads": {"xla_cpu": threads, "torch": torch_out["threads"] if torch_out else None},
        "jax": {"name": jax_name, **jax_res, "jax_version": jax.__version__},
        "torch": ({"best": torch_out.get("best"), **(torch_best or {}), "variants": torch_out["variants"],
                   "torch_version": torch_out["torch"], "transformers_version": torch_out["transformers"]}
                  if torch_out else None),
        "torch_note": torch_note or None,
        "jax_over_torch": speedup,
        "goal_jax_over_torch": GOAL_SPEEDUP,
        "moe_scaling_64_over_8": scaling,
        "goal_moe_scaling": GOAL_SCALING,
        "load_average": [load0[0], load1[0]],
        "wall_s": wall,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
