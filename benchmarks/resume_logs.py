"""What a resume spends on the run directory's logs: `RunDir.prepare(fresh=False)` (every JSONL log
checked, a torn final line cut off) and `keep_steps` (the step logs cut back to the checkpoint's
step), timed and with the process's peak memory, on logs the size of the soak's hour (12,000
steps of the demo's 128 samples: a 280 MB consumed.jsonl) or on a real run's logs (`--run-dir`).

    .venv/bin/python -m benchmarks.resume_logs [--steps 12000] [--baseline-tree DIR]

With `--baseline-tree` (a checkout of another commit: `git worktree add /tmp/base <commit>`) the
same logs are resumed by both trees' code, alternating, each in its own process on its own copy:
the ratio is measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._timing import medians, rotated
from benchmarks.common import REPO, headline, machine_info, print_table, result_path, run_script, write_result

LOGS = (
    "metrics.jsonl",
    "consumed.jsonl",
    "samples.jsonl",
    "events.jsonl",
    "probes.jsonl",
    "rollout_timeline.jsonl",
    "receipts.jsonl",
)
CHILD = """
import json, resource, sys, time
from pathlib import Path
from rlhf_cluster.run.run_dir import RunDir
root, last = Path(sys.argv[1]), int(sys.argv[2])
run = RunDir(root, root / "weights", root / "checkpoints")
began = time.perf_counter()
run.prepare(fresh=False, job_name="bench")
repaired = time.perf_counter()
run.keep_steps(last)
done = time.perf_counter()
print(json.dumps({"repair_s": repaired - began, "keep_steps_s": done - repaired, "total_s": done - began,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthetic_logs(root: Path, steps: int, samples: int) -> None:
    """Step logs in the shapes a job writes them (consumed rows as `Reporter` appends them), with
    a torn final line in metrics.jsonl, as a SIGKILL mid-append leaves it."""
    root.mkdir(parents=True)
    metric_keys = [f"metric_{i:02d}" for i in range(60)]
    with (
        open(root / "consumed.jsonl", "w") as consumed,
        open(root / "metrics.jsonl", "w") as metrics,
        open(root / "samples.jsonl", "w") as sampled,
        open(root / "rollout_timeline.jsonl", "w") as timeline,
    ):
        for step in range(steps):
            for i in range(samples):
                group = f"train-{(step * 16 + i // 8) % 5000}:{step * 977 % 4096:012x}"
                row = {
                    "step": step,
                    "sample_id": f"{group}:{i % 8}",
                    "prompt_id": group.split(":")[0],
                    "policy_version": step,
                    "worker": f"gen{i % 2}",
                    "policy_versions": [[step, step]],
                    "rolled_back_steps": 0,
                }
                consumed.write(json.dumps(row) + "\n")
            metrics.write(
                json.dumps({"step": step, "time": 1.8e9 + step, **{k: step * 0.001 for k in metric_keys}}) + "\n"
            )
            sampled.write(json.dumps({"step": step, "prompt": "What is 12 + 30?" * 4, "response": "42" * 200}) + "\n")
            for g in range(8):
                timeline.write(
                    json.dumps(
                        {
                            "group": f"{step}-{g}",
                            "worker": f"gen{g % 2}",
                            "requested": 1.0,
                            "generated": 2.0,
                            "scored": 3.0,
                            "version": step,
                        }
                    )
                    + "\n"
                )
        metrics.write(f'{{"step": {steps}, "time": 1.8e9, "metric_')  # torn
    (root / "events.jsonl").write_text(json.dumps({"event": "resumed", "time": 1.0, "from_step": 0}) + "\n")


def resume_once(tree: Path, logs: Path, last_step: int) -> dict:
    with tempfile.TemporaryDirectory(dir=logs.parent) as scratch:
        run = Path(scratch) / "run"
        run.mkdir()
        for name in LOGS:
            if (logs / name).exists():
                shutil.copyfile(logs / name, run / name)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(run), str(last_step)],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12_000, help="steps of synthetic logs (an hour of the soak's job)")
    ap.add_argument("--samples-per-step", type=int, default=128)
    ap.add_argument("--run-dir", type=Path, help="resume a copy of this run's logs instead of synthetic ones")
    ap.add_argument("--last-step", type=int, help="the checkpoint's step to cut back to (default: 10 before the end)")
    ap.add_argument("--baseline-tree", type=Path, help="a checkout of the commit to compare with")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    sides = {"this tree": REPO, **({"baseline": args.baseline_tree.resolve()} if args.baseline_tree else {})}
    with tempfile.TemporaryDirectory(prefix="resume-logs-") as tmp:
        logs = Path(tmp) / "logs"
        if args.run_dir:
            logs.mkdir()
            for name in LOGS:
                if (args.run_dir / name).exists():
                    shutil.copyfile(args.run_dir / name, logs / name)
            with open(logs / "metrics.jsonl", "rb") as fh:
                last = json.loads(fh.readlines()[-1])["step"]
        else:
            synthetic_logs(logs, args.steps, args.samples_per_step)
            last = args.steps - 1
        last_step = args.last_step if args.last_step is not None else last - 10
        sizes_mb = {name: (logs / name).stat().st_size / 1e6 for name in LOGS if (logs / name).exists()}
        print(
            f"logs: {sum(sizes_mb.values()):.0f} MB ({', '.join(f'{k} {v:.0f}' for k, v in sizes_mb.items())}); "
            f"cut back to step {last_step}",
            flush=True,
        )
        timings: dict[str, list[dict]] = {side: [] for side in sides}
        for rep in range(args.reps):
            for side in rotated(list(sides), rep):
                timings[side].append(resume_once(sides[side], logs, last_step))
                print(f"  rep {rep} {side}: {timings[side][-1]}", flush=True)
    keys = ("repair_s", "keep_steps_s", "total_s", "peak_rss_mb")
    table = medians(timings, keys)
    print_table(
        ["side", *keys],
        [[side, *(table[side][k] for k in keys)] for side in sides],
        ["{}", "{:.2f}", "{:.2f}", "{:.2f}", "{:.0f}"],
    )
    if "baseline" in table:
        ratio = table["baseline"]["total_s"] / table["this tree"]["total_s"]
        head = headline("resume log handling, baseline / this tree (time)", ratio, "> 1", ratio > 1, "x")
    else:
        head = headline("resume log handling (prepare + keep_steps)", table["this tree"]["total_s"], "", None, "s")
    write_result(
        result_path("resume_logs"),
        {
            "headline": head,
            "machine": machine_info(),
            "logs_mb": sizes_mb,
            "last_step": last_step,
            "baseline_tree": str(args.baseline_tree) if args.baseline_tree else None,
            "medians": table,
            "timings": timings,
        },
    )
    return 0


if __name__ == "__main__":
    run_script(main)
