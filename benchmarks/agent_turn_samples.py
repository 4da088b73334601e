"""The tool demo through an agent, trained as one sample per episode and as one per model turn
(`generation.agent.samples`): does it learn the same way both ways?

`configs/tool_demo.yaml` (its supervised warm-up, then `--steps` GRPO steps) with its environment
replaced by `tests/integration/tool_demo_agent.py`, the same episode written as an agent over the
gateway's completions endpoint. Per `--seeds`, two jobs from the same warm-up: `samples: episode`
(the episode is one token sequence, the calculator's results masked out) and `samples: turn`
(each model turn its own sample, on the context the engine saw; the episode's reward and
advantage on every turn). The figure is the sampled held-out accuracy (30 sums never trained on x
32 answers, through the same agent), before -> after.

    .venv/bin/python -m benchmarks.agent_turn_samples [--seeds 0 1 2 --steps 120]
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from pathlib import Path

from benchmarks import _learning as learning
from benchmarks._jobs import local_ray, run_job_quietly
from benchmarks.common import REPO, headline, run_script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return learning.jobs_parser(__doc__, "agent_turn_samples", steps=120, sides=("episode", "turn")).parse_args(argv)


def config(args: argparse.Namespace, samples: str, seed: int, run_dir: Path):
    from rlhf_cluster.config import load_config

    cfg = load_config(
        REPO / "configs" / "tool_demo.yaml",
        learning.job_overrides(run_dir, args.cache_dir, seed, f"bench-agent-{samples}-s{seed}", args.steps),
    )
    raw = cfg.model_dump()
    raw["generation"]["environment"] = None
    raw["generation"]["agent"] = {
        "function": "tests.integration.tool_demo_agent:run",
        "samples": samples,
        "isolation": "thread",
        "timeout_s": 120,
    }
    return type(cfg).model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The agent is `tests.integration.tool_demo_agent`: importable here (run from the repository's root,
    # as `python -m benchmarks.agent_turn_samples`) and, through PYTHONPATH, in every process the job starts.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    args.cache_dir = str(Path(args.cache_dir).expanduser())
    t0 = time.perf_counter()
    with local_ray(args.verbose, "bench-agent-") as runs:

        def job(samples: str, seed: int) -> dict:
            result = run_job_quietly(config(args, samples, seed, runs / f"{samples}-s{seed}"), args.verbose)
            return {"samples": samples, "seed": seed, **learning.held_out(result)}

        jobs = learning.run_per_seed(args, job, show, partial(report, args), t0)
    report(args, jobs, time.perf_counter() - t0, final=True)
    return 0


def show(job: dict) -> str:
    return f"  samples: {job['samples']}, seed {job['seed']}: {learning.held_out_text(job)}, {job['seconds']:.0f}s"


def report(args: argparse.Namespace, jobs: list[dict], seconds: float, final: bool) -> None:
    gains = learning.gains_by_side(jobs, args.sides, "samples")
    learns = all(gains.get(side) and min(gains[side]) > 0 for side in args.sides)
    top = headline("every seed gains with each kind of sample", float(learns), "= 1", learns, "")
    learning.write_jobs(args, "agent_turn_samples", final, seconds, jobs, gains, top)
    if final:
        print(
            f"\nagent_turn_samples  configs/tool_demo.yaml through an agent, {args.steps} steps: sampled held-out "
            f"accuracy | {seconds:.0f}s"
        )
        learning.print_jobs(jobs, "samples", "samples")


if __name__ == "__main__":
    run_script(main)
