"""Plot a run's per-step metrics (reward, KL, response length, diversity, pool busy share) and held-out
accuracy (before, periodic, after) to a PNG; draw a step trace."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_cluster.fileio import output_path, read_jsonl

# Each panel of a run's plot: its title and the series it draws when the rows have them (older
# runs lack some). The sixth panel is the held-out accuracy (`_draw_evaluation`).
PANELS = [
    ("reward", [("reward_mean", "mean"), ("reward_min", "min"), ("reward_max", "max")]),
    ("KL to reference (k3, per token)", [("kl", "kl")]),
    (
        "response length (tokens)",
        [("response_len_mean", "mean"), ("response_len_p90", "p90"), ("response_len_max", "max")],
    ),
    (
        "diversity (reward hacking watch)",
        [
            ("distinct_2", "distinct-2"),
            ("unique_per_group", "unique per group"),
            ("truncated_fraction", "truncated"),
        ],
    ),
    (
        "where the step goes (share)",
        [
            ("busy_generation", "generation busy"),
            ("busy_reward", "reward busy"),
            ("busy_reference", "reference busy"),
            ("busy_teacher", "teacher busy"),
            ("busy_judge", "judge busy"),
        ],
    ),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Read RUN_DIR/metrics.jsonl (and eval.json when present) and write a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} does not exist: is {run_dir} a run directory?")
    rows = read_jsonl(metrics).rows  # a torn final line (a crash mid-append) is left out
    if not rows:
        raise ValueError(f"{metrics} has no rows yet")
    evaluation = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else None
    target = output_path(out if out is not None else run_dir / "metrics.png")

    fig, axes = plt.subplots(2, 3, figsize=(15, 7), constrained_layout=True)
    for ax, (title, series) in zip(axes.flat, PANELS):
        for key, label in series:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], label=label)
        if len(series) > 1 and ax.lines:
            ax.legend(fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
    _draw_evaluation(axes.flat[5], rows, evaluation)
    fig.suptitle(run_dir.name)
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(target)
    return target


def _draw_evaluation(ax, rows: list[dict], evaluation: dict | None) -> None:
    """The held-out panel: eval.json's before and after (`evaluation`) around the periodic
    evaluations of the metrics rows, greedy, sampled and pass@k accuracy; the greedy and sampled
    reward where the reward does not say which answers are right (no accuracy measured)."""
    measured = any("eval_accuracy" in r for r in rows)
    measured = measured or (evaluation or {}).get("accuracy_before") is not None
    what, column = ("accuracy", "eval_accuracy") if measured else ("reward", "eval_reward_mean")
    ax.set_title("held-out accuracy" if measured else "held-out reward (mean)")
    ax.set_xlabel("step")
    periodic = [r for r in rows if column in r]  # data.eval_every_steps: after step r["step"]
    if evaluation is None and not periodic:
        ax.text(0.5, 0.5, "no held-out evaluation in this run", ha="center", va="center", transform=ax.transAxes)
        return
    last_step = rows[-1]["step"]

    def eval_series(column: str, before: str, after: str) -> tuple[list[float], list[float]]:
        points = [(0, (evaluation or {}).get(before))] + [(r["step"] + 1, r.get(column)) for r in periodic]
        points.append((last_step + 1, (evaluation or {}).get(after)))
        points = [(x, y) for x, y in points if y is not None]
        return [x for x, _ in points], [y for _, y in points]

    ax.plot(*eval_series(column, f"{what}_before", f"{what}_after"), marker="o", label="greedy")
    sampled = f"eval_sampled_{'accuracy' if measured else 'reward_mean'}"
    xs, ys = eval_series(sampled, f"sampled_{what}_before", f"sampled_{what}_after")
    if ys:
        ax.plot(xs, ys, marker="o", label="sampled (mean)")
    for column in sorted({c for r in periodic for c in r if c.startswith("eval_pass@")}):
        k = column.removeprefix("eval_pass@")
        ax.plot(
            *eval_series(column, f"pass@{k}_before", f"pass@{k}_after"),
            marker=".",
            linestyle="--",
            label=f"pass@{k}",
        )
    ax.legend()
    if measured:
        ax.set_ylim(0, 1)


def plot_trace(doc: dict, out: str | Path, title: str = "") -> Path:
    """Draw a trace-event JSON (`tracing.chrome_trace`) as one row of bars per track, coloured by
    span name, for a picture where no trace viewer is at hand; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = output_path(out)
    events = doc["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    rows = sorted(threads, reverse=True)  # the first process (the driver) at the top
    spans = [e for e in events if e["ph"] == "X"]
    names = sorted({e["name"] for e in spans})
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(14, 0.45 * len(rows) + 1.6), constrained_layout=True)
    for y, key in enumerate(rows):
        # Longest first: a span nested in another (forward inside train_step) is drawn on top of it.
        for e in sorted((e for e in spans if (e["pid"], e["tid"]) == key), key=lambda e: -e["dur"]):
            ax.broken_barh([(e["ts"] / 1e6, max(e["dur"] / 1e6, 1e-4))], (y - 0.4, 0.8), color=colours[e["name"]])
    ax.set_yticks(range(len(rows)), [threads[k] for k in rows])
    ax.set_xlabel("seconds")
    ax.set_title(title)
    fig.legend(
        handles=[matplotlib.patches.Patch(color=colours[n], label=n) for n in names],
        ncol=min(len(names), 8),
        loc="outside lower center",
        fontsize="small",
    )
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
