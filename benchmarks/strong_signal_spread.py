"""How much does a short RL run raise a reward any model can learn, over seeds and CPU kernels?

`tests/integration/test_learns_a_strong_signal.py` is `make test`'s check that the whole loop
learns (generation -> scoring -> learner -> weights -> generation): a random tiny model, the
positive-control reward `digit_share` (`rlhf_cluster/rewards/controls.py`), 20 GRPO steps at lr
1e-2, 8 prompts x 8 samples per step. It asserts that the mean reward of the last 4 steps exceeds
that of the first 4 by a margin; this benchmark measures that rise at every seed and ATen capability (each capability in
its own process, as `reward_model_spread.py` does), which is what the margin is set from.

    .venv/bin/python -m benchmarks.strong_signal_spread [--seeds 0 1 2 3 4] [--capabilities native avx2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks._jobs import local_ray, run_job_quietly
from benchmarks.common import headline, machine_info, print_table, result_path, rows_per_capability, write_result

MARGIN = 0.4  # the test's (tests/integration/test_learns_a_strong_signal.py)
WINDOW = 4  # steps averaged at each end


def job_sections(steps: int = 20) -> dict:
    """The test's job: its sections over tests/conftest.py's `job_config` defaults."""
    return {
        "generation": {"replicas": 1, "prompts_per_request": 2, "sampling": {"n": 8, "max_new_tokens": 8}},
        "scoring": {
            "reference": False,
            "rewards": [{"type": "function", "function": "rlhf_cluster.rewards.controls:digit_share"}],
        },
        "algorithm": {"kl": {"coef": 0.0}},
        "learner": {"world_size": 1, "lr": 1e-2},
        "train": {"total_steps": steps, "prompts_per_step": 8, "max_staleness": 1, "progress": False},
    }


def rise(rewards: list[float]) -> tuple[float, float]:
    """(mean of the first WINDOW steps' rewards, mean of the last WINDOW's)."""
    return statistics.mean(rewards[:WINDOW]), statistics.mean(rewards[-WINDOW:])


def run_seeds(args: argparse.Namespace) -> list[dict]:
    import torch

    from rlhf_cluster.config import JobConfig

    rows = []
    with local_ray(args.verbose, "strong-signal-") as runs:
        for seed in args.seeds:
            cfg = JobConfig.model_validate(
                {
                    "name": "strong-signal",
                    "seed": seed,
                    "run_dir": str(runs / f"seed{seed}"),
                    "model": {"cache_dir": str(runs / "models")},
                    "data": {"num_prompts": 256, "eval_prompts": 0},
                    **job_sections(args.steps),
                }
            )
            result = run_job_quietly(cfg, args.verbose)
            rewards = [r["reward_mean"] for r in result.rows]
            first, last = rise(rewards)
            rows.append(
                {
                    "seed": seed,
                    "capability": torch.backends.cpu.get_cpu_capability(),
                    "first": first,
                    "last": last,
                    "rise": last - first,
                    "rewards": [round(x, 3) for x in rewards],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--capabilities",
        nargs="+",
        default=["native", "avx2", "default"],
        help="`native`: no ATEN_CPU_CAPABILITY; others are its values (one run per distinct kernel set)",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=result_path("strong_signal_spread"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        print("ROWS " + json.dumps(run_seeds(args)), flush=True)
        return 0
    rows = rows_per_capability(
        "benchmarks.strong_signal_spread",
        ["--steps", str(args.steps), "--seeds", *map(str, args.seeds)],
        args.capabilities,
        args.verbose,
    )
    print_table(
        ["capability", "seed", f"reward, first {WINDOW} steps", f"last {WINDOW}", "rise"],
        [[r["capability"], r["seed"], r["first"], r["last"], r["rise"]] for r in rows],
        ["{}", "{}", "{:.3f}", "{:.3f}", "{:+.3f}"],
    )
    worst = min(r["rise"] for r in rows)
    write_result(
        args.out,
        {
            "machine": machine_info(),
            "steps": args.steps,
            "rows": rows,
            "headline": headline("smallest reward rise", worst, f">= the test's margin {MARGIN}", worst >= MARGIN),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
