"""Does every algorithm preset learn? The demo job with each preset, over several seeds, against a
placebo (GRPO on a uniform random reward).

Each job is `configs/demo.yaml` (or `--config`, e.g. `configs/tool_demo.yaml`, the multi-turn tool
task) with `algorithm.preset` set (PPO with a critic: `configs/ppo.yaml`), `seed` varied (it seeds
data order, engine sampling, learner and critic head) and the config's steps (or `--steps`),
run as a full `Job` in one local Ray instance. The figure is the sampled held-out accuracy gain:
30 held-out sums x `data.eval_samples` answers each, after RL minus before. Per preset: every
seed's gain, their mean, min and max, and the placebo's beside them; a preset learns when its
worst seed gains, and by more than the placebo's best. The demo's own overrides apply to every
preset (no KL term, token TIS with cap 2); DAPO's overlong buffer is 1 token (its preset's
0.2 of the demo's max_new_tokens rounds to 1 as well; written out, the figure does not move with the preset).

    .venv/bin/python -m benchmarks.presets_learn [--presets grpo dapo ... --seeds 0 1 2 --steps 240]
    .venv/bin/python -m benchmarks.presets_learn --config configs/tool_demo.yaml --presets grpo placebo \
        --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from benchmarks import _learning as learning
from benchmarks._jobs import local_ray, run_job_quietly
from benchmarks.common import REPO, headline, print_table, run_script

PLACEBO = "placebo"
PPO = "ppo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from rlhf_cluster.algorithms.presets import PRESETS

    p = learning.jobs_parser(
        __doc__, "presets_learn", steps=None, steps_help="learner steps per job (default: the config's; the demo's 240)"
    )
    p.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "demo.yaml",
        help="the job every preset starts from (configs/tool_demo.yaml: the multi-turn tool task)",
    )
    p.add_argument(
        "--presets", nargs="+", default=[*PRESETS, PPO, PLACEBO], help="presets to run (ppo: configs/ppo.yaml)"
    )
    p.add_argument(
        "--keep-runs",
        type=Path,
        default=None,
        help="keep every job's run directory under this folder (default: removed with the scratch space)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="held-out evaluation every N steps, into each run's metrics.jsonl (default: before and after only)",
    )
    return p.parse_args(argv)


def job_config(args: argparse.Namespace, preset: str, seed: int, run_dir: Path):
    from rlhf_cluster.config import load_config

    if preset == PPO and args.config.name != "demo.yaml":
        raise SystemExit("--presets ppo runs configs/ppo.yaml (the demo with a critic); leave it out with --config")
    base = REPO / "configs" / "ppo.yaml" if preset == PPO else args.config
    sets = learning.job_overrides(
        run_dir, args.cache_dir, seed, f"bench-presets-{preset}-s{seed}-{os.getpid()}", args.steps, args.eval_every
    )
    if preset == PLACEBO:
        task = load_config(base).data.task  # the placebo judges correctness the way the task's verifier does
        sets += [f"scoring.rewards=[{{type: function, function: 'rlhf_cluster.rewards.controls:placebo_{task}'}}]"]
    elif preset != PPO:
        sets += [f"algorithm.preset={preset}"]
        if preset == "dapo":
            # DAPO's soft overlong punishment starts `overlong_buffer` tokens before the limit; the
            # demo's responses have at most 4 tokens (an answer and EOS), so only the last one is
            # the buffer: a response that hits the limit is punished (and filtered), no answer is.
            sets += ["algorithm.shaping.overlong_buffer=1"]
    return load_config(base, sets)


def run_job(args: argparse.Namespace, preset: str, seed: int, run_dir: Path) -> dict:
    start = time.perf_counter()
    result = run_job_quietly(job_config(args, preset, seed, run_dir), args.verbose)
    return {
        "preset": preset,
        "seed": seed,
        "seconds": time.perf_counter() - start,
        **learning.held_out(result),
        "greedy_before": result.accuracy_before,
        "greedy_after": result.accuracy_after,
        "first_reward": statistics.fmean(r["reward_mean"] for r in result.rows[:10]),
        "final_reward": statistics.fmean(r["reward_mean"] for r in result.rows[-10:]),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs: list[dict] = []
    t0 = time.perf_counter()
    with local_ray(args.verbose, "bench-presets-") as runs:
        for seed in args.seeds:
            for preset in args.presets:
                job = run_job(args, preset, seed, (args.keep_runs or runs) / f"{preset}-s{seed}-job{len(jobs)}")
                jobs.append(job)
                print(f"  {preset} seed {seed}: {learning.held_out_text(job)}, {job['seconds']:.0f}s", flush=True)
                time.sleep(2)
                report(args, jobs, time.perf_counter() - t0, final=False)
    report(args, jobs, time.perf_counter() - t0, final=True)
    return 0


def report(args: argparse.Namespace, jobs: list[dict], seconds: float, final: bool) -> None:
    """The table over the jobs run so far: written to the result file after every job (a cut-off
    run keeps what it measured, marked `complete: false`), printed at the end."""
    gains = learning.gains_by_side(jobs, args.presets, "preset")
    gains = {p: g for p, g in gains.items() if g}
    placebo_best = max(gains[PLACEBO]) if PLACEBO in gains else None
    table = []
    for preset, g in gains.items():
        # Learning means every seed gained, by more than the placebo's best (which may be a loss).
        learns = None if placebo_best is None or preset == PLACEBO else learning.beats_control(gains, preset, PLACEBO)
        table.append(
            [
                preset,
                " ".join(f"{x:+.3f}" for x in g),
                statistics.fmean(g),
                min(g),
                max(g),
                "-" if learns is None else ("yes" if learns else "NO"),
            ]
        )
    compared = [row for row in table if row[5] in ("yes", "NO")]
    value = sum(row[5] == "yes" for row in compared)
    top = headline(
        "presets whose every seed gains, beyond the placebo's best",
        value,
        f"= {len(compared)} (all)",
        value == len(compared) if compared else None,
    )
    learning.write_jobs(args, "presets_learn", final, seconds, jobs, gains, top)
    if final:
        steps = args.steps or "the config's"
        print(
            f"\npresets_learn  {args.config.name}, {steps} steps, seeds {args.seeds}: sampled held-out accuracy gain "
            f"(after - before) | {os.cpu_count()} CPUs | {seconds:.0f}s"
        )
        print_table(
            ["preset", "gain per seed", "mean", "min", "max", "worst seed > max(0, placebo's best)"],
            table,
            ["{}", "{}", "{:+.3f}", "{:+.3f}", "{:+.3f}", "{}"],
        )


if __name__ == "__main__":
    run_script(main)
