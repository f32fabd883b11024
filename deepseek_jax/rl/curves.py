"""Learning curves of a GRPO run (or of the GRPO stages of a chain) as one PNG: accuracy, reward, response length,
KL to the reference, entropy, and the share of groups with a reward spread, against the GRPO step."""

from __future__ import annotations

from collections.abc import Sequence

# (metric, panel title); accuracy also shows the held-out greedy eval_accuracy as dots
PANELS = (("accuracy", "accuracy (sampled; dots: held-out greedy)"), ("reward", "mean reward"),
          ("response_length", "response length (tokens)"), ("kl", "KL to the reference"),
          ("entropy", "entropy (nats / token)"), ("groups_kept", "groups with a reward spread"))


def plot_curves(stages: Sequence[tuple[str, list[dict]]], path: str, start_accuracy: float | None = None) -> None:
    """Write the curves of `stages` ((name, metrics rows) in order; steps continue across them, a dashed line
    marks each boundary) to `path`. `start_accuracy`, the held-out accuracy before GRPO, is drawn at step 0."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    offset = 0
    for k, (name, rows) in enumerate(stages):
        color = f"C{k}"
        for ax, (metric, _) in zip(axes.flat, PANELS, strict=True):
            pts = [(offset + r["step"], r[metric]) for r in rows if metric in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=color, lw=1.2, label=name)
        evals = [(offset + r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
        if k == 0 and start_accuracy is not None:
            evals.insert(0, (0, start_accuracy))
        if evals:
            axes.flat[0].plot(*zip(*evals, strict=True), "o-", color=color, ms=4, lw=0.8)
        offset += max((r["step"] for r in rows), default=0)
        if k < len(stages) - 1:
            for ax in axes.flat:
                ax.axvline(offset, color="gray", ls="--", lw=0.8)
    for ax, (_, title) in zip(axes.flat, PANELS, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step", fontsize=9)
        ax.grid(alpha=0.3)
    if len(stages) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
