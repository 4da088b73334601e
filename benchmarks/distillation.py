"""On-policy distillation on the demo task: does a student pulled toward a teacher's per-token
log-probs (`algorithm.distillation`, no task reward in its advantages) rise toward the teacher's
held-out accuracy, beyond a control distilled from a random-weight teacher?

1. The teacher: `configs/demo.yaml` at `--teacher-seed` (supervised warm-up, then 240 GRPO steps
   on the verifier's reward), its last version written out as a Hugging Face folder.
2. The random teacher (control): the demo's tiny model at another initialisation seed (same
   tokenizer, random weights).
3. Per `--seeds`: the demo job from the same warmed-up start with `algorithm.distillation.teacher`
   set to each teacher (coef `--coef`, `mix_with_rewards: false`: the verifier's rewards are
   computed and reported, never trained on), `--steps` steps.

The figure is the sampled held-out accuracy (30 sums never trained on x 32 answers), before ->
after, as the demo reports it; the teacher's own is its run's "after".

    .venv/bin/python -m benchmarks.distillation [--seeds 0 1 2 --steps 240 --coef 1.0]
"""

from __future__ import annotations

import argparse
import shutil
import time
from functools import partial
from pathlib import Path

from benchmarks import _learning as learning
from benchmarks._jobs import local_ray, run_job_quietly
from benchmarks.common import REPO, headline, run_script


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = learning.jobs_parser(
        __doc__,
        "distillation",
        steps=240,
        sides=("teacher", "random"),
        steps_help="steps of every job (the teacher's too)",
    )
    p.add_argument("--teacher-seed", type=int, default=0, help="seed of the teacher's GRPO run")
    p.add_argument("--coef", type=float, default=1.0, help="algorithm.distillation.coef")
    return p.parse_args(argv)


def config(args: argparse.Namespace, name: str, seed: int, run_dir: Path, teacher: str | None):
    from rlhf_cluster.config import load_config

    sets = learning.job_overrides(run_dir, args.cache_dir, seed, f"bench-distill-{name}-s{seed}", args.steps)
    if teacher is not None:
        sets += [f"algorithm.distillation.teacher={teacher}", f"algorithm.distillation.coef={args.coef}"]
    return load_config(REPO / "configs" / "demo.yaml", sets)


def figures(result) -> dict:
    return {
        **learning.held_out(result),
        "greedy_before": result.accuracy_before,
        "greedy_after": result.accuracy_after,
        # The learner's KL estimate to the reference log-probs: with distillation, the teacher's.
        "kl_first": _mean(result.rows[:10], "kl"),
        "kl_last": _mean(result.rows[-10:], "kl"),
    }


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def teacher_folder(cfg, out: Path) -> str:
    """The teacher run's newest version as a Hugging Face folder: the tiny model's config and
    tokenizer, the trained tensors (an output embedding tied to the input one is tied on load)."""
    from safetensors.torch import save_file

    from rlhf_cluster.models.tiny_model import tiny_model_dir
    from rlhf_cluster.weights import WeightStore

    store = WeightStore(cfg.weights_dir)
    version = store.latest_version()
    assert version is not None, "the teacher's run published no version"
    shutil.copytree(tiny_model_dir(cfg.model.tiny, cfg.model.cache_dir), out)
    tensors = {name: t.contiguous() for name, t in store.load(version).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def random_teacher(cfg) -> str:
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    return str(
        ensure_tiny_model(cfg.model.tiny.model_copy(update={"seed": cfg.model.tiny.seed + 1000}), cfg.model.cache_dir)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.cache_dir = str(Path(args.cache_dir).expanduser())
    t0 = time.perf_counter()
    with local_ray(args.verbose, "bench-distill-") as runs:
        start = time.perf_counter()
        cfg = config(args, "teacher-grpo", args.teacher_seed, runs / "teacher", None)
        trained = {**figures(run_job_quietly(cfg, args.verbose)), "seconds": time.perf_counter() - start}
        teachers = {"teacher": teacher_folder(cfg, runs / "teacher-model"), "random": random_teacher(cfg)}
        print(
            f"  teacher (GRPO, seed {args.teacher_seed}): sampled held-out {trained['sampled_before']:.3f} -> "
            f"{trained['sampled_after']:.3f}",
            flush=True,
        )

        def job(side: str, seed: int) -> dict:
            result = run_job_quietly(config(args, side, seed, runs / f"{side}-s{seed}", teachers[side]), args.verbose)
            return {"side": side, "seed": seed, **figures(result)}

        jobs = learning.run_per_seed(args, job, show, partial(report, args, trained), t0)
    report(args, trained, jobs, time.perf_counter() - t0, final=True)
    return 0


def show(job: dict) -> str:
    return (
        f"  distilled from the {job['side']} teacher, seed {job['seed']}: {learning.held_out_text(job)}, "
        f"KL to the teacher {job['kl_first']:.4f} -> {job['kl_last']:.4f}, {job['seconds']:.0f}s"
    )


def report(args: argparse.Namespace, teacher: dict, jobs: list[dict], seconds: float, final: bool) -> None:
    gains = learning.gains_by_side(jobs, args.sides)
    learns = learning.beats_control(gains, "teacher", "random")
    top = headline("every seed gains, beyond the random-teacher control's best", float(learns), "= 1", learns, "")
    learning.write_jobs(args, "distillation", final, seconds, jobs, gains, top, teacher_run=teacher)
    if final:
        print(
            f"\ndistillation  configs/demo.yaml, {args.steps} steps, coef {args.coef}: sampled held-out accuracy "
            f"(teacher: {teacher['sampled_after']:.3f}) | {seconds:.0f}s"
        )
        kl = {"KL to the teacher, first -> last 10 steps": lambda j: f"{j['kl_first']:.4f} -> {j['kl_last']:.4f}"}
        learning.print_jobs(jobs, "teacher", more=kl)


if __name__ == "__main__":
    run_script(main)
