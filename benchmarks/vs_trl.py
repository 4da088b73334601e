"""Our decoupled job vs TRL's `GRPOTrainer` doing the same GRPO work: seconds per step, completions/s.

Both sides train the SAME Hugging Face model folder on the SAME arithmetic prompts (one JSONL
file, read in file order by both: no shuffling), with the same group size n, batch
(prompts_per_step x n completions), response limit, sampling (temperature 1.0, top_p 1.0, no
top-k), reward (the arithmetic verifier: correct + 0.2 * digits; TRL calls the very same
`rlhf_cluster/data/tasks.py` functions), k3 KL in the loss with the same beta, PPO clip 0.2, a
token mean over the whole batch, AdamW (constant LR, no weight decay, grad-norm clip 1.0), fp32,
one optimizer step per batch, and the same number of steps.

- **ours**: `Job(cfg)` on a local Ray instance started by this script (one generation
  replica with vLLM, one reward and one reference worker, one FSDP2 learner rank,
  `max_staleness` 1: generation runs one version ahead of the learner), in this process.
- **TRL**: `benchmarks/_trl_side.py` run as a subprocess with the python of TRL's own virtual
  environment (created on first use, default `~/.cache/rlhf_cluster/venv-trl`, outside the
  repository; nothing is added to the project's .venv). `use_vllm=False`: HF `generate`.

Two sizes: `tiny` (the demo model, `TinyModelConfig` defaults: both sides overhead-bound) and
`150m` (a random Qwen2 of 145M parameters with 128-token responses). Per size the sides
alternate (ours-TRL, TRL-ours, ...) for `--reps` repetitions. Per run: seconds per step is the
mean over the steps after the first `--warmup-steps` (each side's own per-step timings: our
driver's `step_seconds`, TRL's time between `on_step_end` callbacks); reported figures are
medians over repetitions. Final reward (tiny only): mean reward of the last `--reward-last` steps.

    .venv/bin/python -m benchmarks.vs_trl [--reps 2 --sizes tiny,150m ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._jobs import local_ray
from benchmarks.common import REPO, machine_info, result_path
from rlhf_cluster.config import (
    AlgorithmConfig,
    CheckpointConfig,
    DataConfig,
    GenerationConfig,
    JobConfig,
    KLConfig,
    LearnerConfig,
    ModelConfig,
    SamplingConfig,
    TinyModelConfig,
    TrainConfig,
)
from rlhf_cluster.data.tasks import arithmetic_rows
from rlhf_cluster.data.verifiers import REWARD_WEIGHTS
from rlhf_cluster.models.tiny_model import ensure_tiny_model

DEFAULT_OUT = result_path("vs_trl")
DEFAULT_VENV = Path("~/.cache/rlhf_cluster/venv-trl")
# A script of its own, run by path with TRL's python (it imports nothing of this repository).
TRL_SIDE = REPO / "benchmarks" / "_trl_side.py"
TASKS_FILE = REPO / "rlhf_cluster" / "data" / "tasks.py"
# Versions that install next to the local CPU torch wheel without pulling another torch.
TORCH_PIN = "torch==2.13.0"
TRL_PINS = ("trl==1.16.0", "transformers==5.19.0", "accelerate==1.15.0", "datasets==5.2.0")

# 145M parameters: 12 x (attention 2.6M + MLP 9.4M) + embeddings; head_dim 64 for vLLM's CPU attention.
BIG_MODEL = TinyModelConfig(
    hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=4, intermediate_size=3072, max_position_embeddings=256
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="tiny,150m", help="comma-separated: tiny, 150m")
    p.add_argument("--reps", type=int, default=2, help="runs per side and size (sides alternate)")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps of every run left out of the timing")
    # tiny: the demo model, overhead-bound (the workload of the TRL comparison in the issue)
    p.add_argument("--tiny-steps", type=int, default=20)
    p.add_argument("--tiny-prompts", type=int, default=32, help="prompts per step (tiny)")
    p.add_argument("--tiny-n", type=int, default=4)
    p.add_argument("--tiny-max-new-tokens", type=int, default=16)
    p.add_argument("--tiny-lr", type=float, default=1e-3, help="the demo config's LR")
    # 150m: generation-heavy
    p.add_argument("--big-steps", type=int, default=3, help="steps per run (150m), warmup included")
    p.add_argument("--big-prompts", type=int, default=4, help="prompts per step (150m)")
    p.add_argument("--big-n", type=int, default=4)
    p.add_argument("--big-max-new-tokens", type=int, default=128)
    p.add_argument("--big-lr", type=float, default=1e-5)
    # shared
    p.add_argument("--beta", type=float, default=0.01, help="k3 KL coefficient in the loss, both sides (ours' default)")
    p.add_argument("--reward-last", type=int, default=5, help="final reward = mean over this many last steps (tiny)")
    p.add_argument(
        "--prompts-per-request",
        type=int,
        default=GenerationConfig().prompts_per_request,
        help="ours: prompt groups per generation request (our default)",
    )
    p.add_argument(
        "--ray-worker-niceness",
        type=int,
        default=0,
        help="niceness of our Ray workers (Ray's own default is 15, which on a shared machine hands CPU to "
        "every other process, TRL's included; 0 = same priority as the TRL process)",
    )
    p.add_argument(
        "--trl-threads",
        type=int,
        default=1,
        help="torch threads of the TRL process (0: torch's default, one per core; on a busy 2-core machine "
        "2 threads ran TRL 3-20x slower than 1, from OpenMP oversubscription)",
    )
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models", help="model cache (both sides load from it)")
    p.add_argument("--trl-venv", type=Path, default=DEFAULT_VENV, help="TRL's virtual environment (created if missing)")
    p.add_argument("--work-dir", type=Path, default=None, help="run dirs, prompt files (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not set(args.sizes) <= {"tiny", "150m"}:
        p.error("--sizes takes tiny and/or 150m")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    for size in ("tiny", "big"):
        if getattr(args, f"{size}_steps") <= args.warmup_steps:
            p.error(f"--{size}-steps must be larger than --warmup-steps")
    return args


# ---- TRL's environment ------------------------------------------------------------------------
def ensure_trl_venv(venv: Path) -> Path:
    """TRL's own venv: created and installed on first use; skipped when it already imports trl."""
    venv = venv.expanduser()
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0:
        return python
    print(f"installing TRL into {venv} (first use; a few minutes)", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # torch first: pip's find-links picks the local CPU wheel; any other torch pulls GBs of CUDA.
    subprocess.run(pip + [TORCH_PIN], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(TORCH_PIN + "\n")
        constraints = fh.name
    try:
        subprocess.run(pip + ["-c", constraints, *TRL_PINS], check=True)
    finally:
        os.unlink(constraints)
    return python


def run_trl(python: Path, model_dir: Path, prompts_file: Path, w: dict, out: Path, threads: int) -> dict:
    flags = {
        "--model": model_dir,
        "--prompts": prompts_file,
        "--tasks-file": TASKS_FILE,
        "--reward-weights": json.dumps(REWARD_WEIGHTS["arithmetic"]),
        "--n": w["n"],
        "--prompts-per-step": w["prompts"],
        "--max-new-tokens": w["max_new_tokens"],
        "--steps": w["steps"],
        "--lr": w["lr"],
        "--beta": w["beta"],
        "--temperature": "1.0",
        "--top-p": "1.0",
        "--threads": threads,
        "--out": out,
    }
    cmd = [str(python), str(TRL_SIDE), *(x for flag, value in flags.items() for x in (flag, str(value)))]
    env = {**os.environ, "PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL side failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


# ---- our side ---------------------------------------------------------------------------------
def our_config(size: str, model_dir: Path, prompts_file: Path, w: dict, run_dir: Path, args) -> JobConfig:
    return JobConfig(
        name=f"vs-trl-{size}",
        run_dir=str(run_dir),
        model=ModelConfig(path=str(model_dir)),
        data=DataConfig(task="arithmetic", path=str(prompts_file), shuffle=False),
        generation=GenerationConfig(
            replicas=1,
            prompts_per_request=args.prompts_per_request,
            sampling=SamplingConfig(n=w["n"], temperature=1.0, top_p=1.0, max_new_tokens=w["max_new_tokens"]),
            max_model_len=256,
        ),
        # Our default algorithm (GRPO advantages, token-mean clipped loss, token TIS), k3 KL in the loss.
        algorithm=AlgorithmConfig(kl=KLConfig(placement="loss", estimator="k3", coef=w["beta"])),
        learner=LearnerConfig(world_size=1, lr=w["lr"]),
        train=TrainConfig(total_steps=w["steps"], prompts_per_step=w["prompts"], max_staleness=1, progress=False),
        checkpoint=CheckpointConfig(every_steps=10**6),  # only the final one, after the timed steps
    )


def run_ours(cfg: JobConfig, args) -> dict:
    from actors.job import Job

    t0 = time.perf_counter()
    with local_ray(False, "vs-trl-", {"worker_niceness": args.ray_worker_niceness}):
        job = Job(cfg)
        try:
            setup_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            result = job.run()
            train_s = time.perf_counter() - t1
        finally:
            job.shutdown()
    rows = result.rows
    return {
        "side": "ours",
        "setup_seconds": setup_s,
        "train_seconds": train_s,
        "step_seconds": [r["step_seconds"] for r in rows],
        "samples_per_step": cfg.samples_per_step,
        "rewards": [r["reward_mean"] for r in rows],
        "completion_len_mean": [r["response_len_mean"] for r in rows],
        "staleness_mean": [r["staleness_mean"] for r in rows],
        "learner_seconds": [r["learner_seconds"] for r in rows],
    }


# ---- figures ----------------------------------------------------------------------------------
def summarize(run: dict, warmup: int, reward_last: int) -> dict:
    timed = run["step_seconds"][warmup:]
    sec = statistics.fmean(timed)
    lens = [x for x in run["completion_len_mean"][warmup:] if x is not None]
    # Where the time goes: TRL's generate+score+reference share of its step; our learner's step
    # (our generation overlaps it).
    trl_gen = run.get("generate_seconds", [])[warmup:]
    learner = run.get("learner_seconds", [])[warmup:]
    return {
        "seconds_per_step": sec,
        "completions_per_s": run["samples_per_step"] / sec,
        "tokens_per_s": run["samples_per_step"] * statistics.fmean(lens) / sec if lens else None,
        "completion_len_mean": statistics.fmean(lens) if lens else None,
        "final_reward": statistics.fmean(run["rewards"][-reward_last:]),
        "first_reward": statistics.fmean(run["rewards"][:reward_last]),
        "setup_seconds": run["setup_seconds"],
        "generate_score_seconds_per_step": statistics.fmean(trl_gen) if trl_gen else None,
        "learner_seconds_per_step": statistics.fmean(learner) if learner else None,
    }


def medians(summaries: list[dict]) -> dict:
    keys = summaries[0].keys()
    return {
        k: statistics.median(s[k] for s in summaries) if all(s[k] is not None for s in summaries) else None
        for k in keys
    }


def workload(size: str, args) -> dict:
    if size == "tiny":
        return {
            "model": TinyModelConfig(),
            "steps": args.tiny_steps,
            "prompts": args.tiny_prompts,
            "n": args.tiny_n,
            "max_new_tokens": args.tiny_max_new_tokens,
            "lr": args.tiny_lr,
            "beta": args.beta,
        }
    return {
        "model": BIG_MODEL,
        "steps": args.big_steps,
        "prompts": args.big_prompts,
        "n": args.big_n,
        "max_new_tokens": args.big_max_new_tokens,
        "lr": args.big_lr,
        "beta": args.beta,
    }


IDENTICAL = (
    "model folder, prompts and their order, n, batch, max_new_tokens, temperature 1.0, top_p 1.0, "
    "no top-k, reward (same verifier code), k3 KL in loss with beta, clip 0.2, token-mean loss over "
    "the batch, AdamW constant LR, grad clip 1.0, fp32, 1 optimizer step per batch, steps"
)
DIFFERENT = (
    "ours: vLLM generation, async (max_staleness 1), token TIS with a recomputed pi_prox (one extra "
    "forward), weights published to the store every step, responses stop at EOS; TRL: HF generate "
    "padded batch (runs to the longest response), synchronous on-policy, in one process"
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_all = time.perf_counter()
    machine = machine_info()
    trl_python = ensure_trl_venv(args.trl_venv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {size: one_size(args, size, work, trl_python) for size in args.sizes}

    trl_versions = next(iter(results.values()))["runs"]["trl"][0]["versions"] if results else {}
    headline_value = results["150m"]["ratio_ours_over_trl_completions_per_s"] if "150m" in results else None
    tiny_step_ratio = results["tiny"]["ratio_ours_over_trl_seconds_per_step"] if "tiny" in results else None
    met = (
        None
        if headline_value is None or tiny_step_ratio is None
        else bool(headline_value >= 2.0 and tiny_step_ratio <= 2.0)
    )
    result = {
        "benchmark": "vs_trl",
        "headline": {
            "name": "completions/s ours/TRL (150M)",
            "value": headline_value,
            "unit": "x",
            "target": ">= 2x at 150M; step time within 2x of TRL on the tiny model",
            "met": met,
            "tiny_seconds_per_step_ours_over_trl": tiny_step_ratio,
        },
        "machine": {**machine, "load_average_at_end": os.getloadavg(), "trl_side": trl_versions},
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
            "trl_pins": [TORCH_PIN, *TRL_PINS],
            "identical": IDENTICAL,
            "different": DIFFERENT,
        },
        "results": results,
        "total_seconds": time.perf_counter() - t_all,
    }
    print_report(args, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def one_size(args: argparse.Namespace, size: str, work: Path, trl_python: Path) -> dict:
    """Both sides `--reps` times at one size, alternating (ours-TRL, TRL-ours, ...): the workload,
    every run, the medians and the ratios ours / TRL."""
    from transformers import AutoConfig

    w = workload(size, args)
    model_dir = ensure_tiny_model(w["model"], args.cache_dir)
    hf = AutoConfig.from_pretrained(model_dir)
    # Prompts in training order; extra ones so our producer (one version ahead) never wraps around.
    prompts_file = work / f"prompts-{size}.jsonl"
    rows = arithmetic_rows((w["steps"] + 2) * w["prompts"], seed=0, split="train")
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for rep in range(args.reps):
        order = ("ours", "trl") if rep % 2 == 0 else ("trl", "ours")
        for side in order:
            print(f"[{size}] rep {rep} {side} ...", flush=True)
            start = time.perf_counter()
            if side == "ours":
                run = run_ours(our_config(size, model_dir, prompts_file, w, work / f"run-{size}-{rep}", args), args)
            else:
                out = work / f"trl-{size}-{rep}.json"
                run = run_trl(trl_python, model_dir, prompts_file, w, out, args.trl_threads)
            run.update(rep=rep, position=order.index(side), wall_seconds=time.perf_counter() - start)
            run["summary"] = s = summarize(run, args.warmup_steps, args.reward_last)
            runs[side].append(run)
            print(
                f"[{size}] rep {rep} {side}: {s['seconds_per_step']:.3f} s/step, {s['completions_per_s']:.1f} "
                f"completions/s, final reward {s['final_reward']:+.4f} ({run['wall_seconds']:.0f} s)",
                flush=True,
            )
    med = {side: medians([r["summary"] for r in rs]) for side, rs in runs.items()}
    paired = [
        o["summary"]["completions_per_s"] / t["summary"]["completions_per_s"] for o, t in zip(runs["ours"], runs["trl"])
    ]
    return {
        "workload": {
            "model_dir": str(model_dir),
            "model_shape": w["model"].model_dump(),
            "parameters": runs["trl"][0].get("model_parameters"),
            "vocab_size": hf.vocab_size,
            "steps": w["steps"],
            "prompts_per_step": w["prompts"],
            "n": w["n"],
            "completions_per_step": w["prompts"] * w["n"],
            "max_new_tokens": w["max_new_tokens"],
            "lr": w["lr"],
            "beta": w["beta"],
            "prompts_file": str(prompts_file),
        },
        "runs": runs,
        "medians": med,
        "ratio_ours_over_trl_completions_per_s": med["ours"]["completions_per_s"] / med["trl"]["completions_per_s"],
        "ratio_ours_over_trl_seconds_per_step": med["ours"]["seconds_per_step"] / med["trl"]["seconds_per_step"],
        "paired_ratios_ours_over_trl_completions_per_s": paired,
    }


def print_report(args: argparse.Namespace, result: dict) -> None:
    print(
        f"\nvs_trl  {args.reps} reps per side (alternating), steps after {args.warmup_steps} warmup, medians; "
        f"beta={args.beta} (k3 KL in the loss) on both sides"
    )
    print(
        f"{'size':<6} {'side':<5} {'params':>7} {'batch':>10} {'s/step':>8} {'compl/s':>9} {'tok/s':>8} {'len':>6} "
        f"{'reward':>8} {'setup s':>8}"
    )
    for size, r in result["results"].items():
        wl = r["workload"]
        for side in ("ours", "trl"):
            m = r["medians"][side]
            reward = f"{m['final_reward']:+.4f}" if size == "tiny" else "-"
            params = f"{(wl['parameters'] or 0) / 1e6:.1f}M"
            batch = f"{wl['prompts_per_step']}x{wl['n']}x{wl['max_new_tokens']}"
            tok = f"{m['tokens_per_s']:.4g}" if m["tokens_per_s"] else "-"
            ln = f"{m['completion_len_mean']:.1f}" if m["completion_len_mean"] else "-"
            print(
                f"{size:<6} {side:<5} {params:>7} {batch:>10} {m['seconds_per_step']:>8.3f} "
                f"{m['completions_per_s']:>9.4g} {tok:>8} {ln:>6} {reward:>8} {m['setup_seconds']:>8.1f}"
            )
        o, t = r["medians"]["ours"], r["medians"]["trl"]
        if o["learner_seconds_per_step"] is not None and t["generate_score_seconds_per_step"] is not None:
            print(
                f"{size:<6} where the step goes: TRL generate+reward+ref {t['generate_score_seconds_per_step']:.3f} s, "
                f"rest (train) {t['seconds_per_step'] - t['generate_score_seconds_per_step']:.3f} s; "
                f"ours learner {o['learner_seconds_per_step']:.3f} s (generation overlaps it)"
            )
        print(
            f"{size:<6} ratio ours/TRL completions/s: {r['ratio_ours_over_trl_completions_per_s']:.2f}  "
            f"(s/step {r['ratio_ours_over_trl_seconds_per_step']:.2f}; paired "
            f"{', '.join(f'{x:.2f}' for x in r['paired_ratios_ours_over_trl_completions_per_s'])})"
        )
    head = result["headline"]
    if head["value"] is not None:
        met = head["met"]
        print(
            f"headline: completions/s ours/TRL (150M) = {head['value']:.2f}  (target >= 2x at 150M and tiny s/step "
            f"ours/TRL <= 2: {'met' if met else 'not met' if met is not None else '-'})"
        )
    print(f"total {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
