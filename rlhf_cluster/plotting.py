"""Plot a run's per-step metrics (reward, KL, response length) and held-out accuracy to a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Read RUN_DIR/metrics.jsonl (and eval.json when present) and write a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist: is {run_dir} a run directory?")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics} has no rows yet")
    steps = [r["step"] for r in rows]
    evaluation = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else None

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    panels = [("reward_mean", "reward (mean)"), ("kl", "KL to reference (k3, per token)"),
              ("response_len_mean", "response length (tokens)")]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes.flat[3]
    ax.set_title("held-out accuracy (verifier)")
    ax.set_xlabel("step")
    if evaluation is not None:
        ends = [0, steps[-1] + 1]
        ax.plot(ends, [evaluation["accuracy_before"], evaluation["accuracy_after"]], marker="o", label="greedy")
        if evaluation.get("sampled_accuracy_before") is not None:
            ax.plot(ends, [evaluation["sampled_accuracy_before"], evaluation["sampled_accuracy_after"]], marker="o",
                    label=f"{evaluation['samples_per_prompt']} samples per prompt")
        ax.legend()
        ax.set_ylim(0, 1)
    else:
        ax.text(0.5, 0.5, "no held-out evaluation in this run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(run_dir.name)
    target = Path(out) if out is not None else run_dir / "metrics.png"
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(target)
    return target
