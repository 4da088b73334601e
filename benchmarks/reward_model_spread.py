"""How far does the reward-model stage's held-out accuracy move with the seed and the CPU's kernels?

`configs/three_stage.yaml`'s SFT and reward-model stages, exactly as `rlhf-cluster pipeline` and
`tests/integration/test_three_stages.py` run them (FSDP2 ranks in a local Ray instance), for each
seed and each ATen CPU capability. PyTorch picks its vectorised kernels by the CPU it finds
(`torch.backends.cpu.get_cpu_capability()`); `ATEN_CPU_CAPABILITY` makes it dispatch as a lesser
CPU, so one machine runs the trajectories of several: `avx2` (what an AVX2-only CI machine runs),
`default` (the scalar kernels) and the machine's own. Each capability runs in its own process (the
variable is read when torch loads, and Ray's workers inherit it from that process).

The figures: held-out pairwise accuracy (30 sums never trained on, 4 wrong answers each; chance
0.5) and the mean reward gap (chosen minus rejected) on them, per seed and capability.

    .venv/bin/python -m benchmarks.reward_model_spread [--seeds 0 1 2 3 4] [--capabilities avx2 default]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks._jobs import local_ray
from benchmarks.common import REPO, headline, machine_info, print_table, result_path, rows_per_capability, write_result

TARGET = 0.75  # issue 39: every seed, every capability


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "three_stage.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--capabilities",
        nargs="+",
        default=["native", "avx2", "default"],
        help="`native`: no ATEN_CPU_CAPABILITY; others are its values. A capability that dispatches "
        "the same kernels as an earlier one on this CPU is run once.",
    )
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides (key=value)")
    p.add_argument("--out", type=Path, default=result_path("reward_model_spread"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def run_seeds(args: argparse.Namespace) -> list[dict]:
    """In this process (one capability): both stages per seed, in one local Ray instance."""
    import torch

    from actors.commands.supervised import run_stage
    from rlhf_cluster.config import load_config
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    rows = []
    with local_ray(args.verbose, "rm-spread-") as runs:
        for seed in args.seeds:
            cfg = load_config(
                str(args.config),
                [
                    f"run_dir={runs / f'seed{seed}'}",
                    f"model.cache_dir={runs / 'models'}",
                    f"seed={seed}",
                    *args.overrides,
                ],
            )
            base = str(ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
            sft = run_stage(cfg, "sft", base, progress=False)
            rm = run_stage(cfg, "reward_model", sft["output"], progress=False)
            rows.append(
                {
                    "seed": seed,
                    "capability": torch.backends.cpu.get_cpu_capability(),
                    "sft_eval_token_accuracy": sft.get("eval_token_accuracy"),
                    "sft_seconds": sft["seconds"],
                    "rm_seconds": rm["seconds"],
                    "accuracy": rm["eval_pairwise_accuracy"],
                    "reward_gap": rm["eval_reward_gap"],
                    "rm_first_loss": rm["first_loss"],
                    "rm_final_loss": rm["final_loss"],
                    "curve": _curve(rm["output"]),
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
            evals = [
                (r["step"] + 1, r["eval_pairwise_accuracy"]) for r in rows[-1]["curve"] if "eval_pairwise_accuracy" in r
            ]
            if len(evals) > 1:
                print(
                    "{" + f'"held-out accuracy by step": "{" ".join(f"{s}:{a:.2f}" for s, a in evals)}"' + "}",
                    flush=True,
                )
    return rows


def _curve(output: str) -> list[dict]:
    """The reward-model stage's training curve: every step's loss and batch accuracy, and held-out
    accuracy where it was evaluated (`reward_model.eval_every_steps`)."""
    history = json.loads((Path(output) / "stage.json").read_text())["history"]
    return [
        {
            k: round(v, 4)
            for k, v in row.items()
            if k in ("step", "loss", "accuracy", "grad_norm", "eval_pairwise_accuracy", "eval_reward_gap")
        }
        for row in history
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("ROWS " + json.dumps(run_seeds(args)), flush=True)
        return 0
    worker_args = ["--config", str(args.config), "--seeds", *map(str, args.seeds)]
    if args.overrides:
        worker_args += ["--set", *args.overrides]
    rows = rows_per_capability("benchmarks.reward_model_spread", worker_args, args.capabilities, args.verbose)
    print_table(
        ["capability", "seed", "SFT held-out token acc", "RM held-out pairwise acc", "reward gap", "RM s"],
        [
            [r["capability"], r["seed"], r["sft_eval_token_accuracy"], r["accuracy"], r["reward_gap"], r["rm_seconds"]]
            for r in rows
        ],
        ["{}", "{}", "{:.3f}", "{:.3f}", "{:+.3f}", "{:.0f}"],
    )
    worst = min(r["accuracy"] for r in rows)
    accs = [r["accuracy"] for r in rows]
    print(
        f"held-out pairwise accuracy over {len(rows)} runs: min {worst:.3f}, mean {statistics.mean(accs):.3f}, "
        f"max {max(accs):.3f}; reward gap min {min(r['reward_gap'] for r in rows):+.3f}"
    )
    met = worst >= TARGET and all(r["reward_gap"] > 0 for r in rows)
    write_result(
        args.out,
        {
            "machine": machine_info(),
            "config": str(args.config),
            "overrides": args.overrides,
            "rows": rows,
            "headline": headline(
                "worst held-out pairwise accuracy", worst, f">= {TARGET} at every seed and capability, gap > 0", met
            ),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
