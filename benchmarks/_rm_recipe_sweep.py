"""A quick screen of reward-model recipes: both supervised stages in this one process, one rank.

Not a benchmark of its own (`make bench` skips `_*.py`): the tool used to screen recipes for
issue 39 before measuring the chosen one with `reward_model_spread.py`, which runs the stages
exactly as the pipeline does (FSDP2 ranks in Ray). Here the same `SupervisedTrainer` code runs on a
one-rank gloo group with no Ray, about 3x faster per seed, so a recipe's spread over eight seeds
takes minutes. One rank follows other trajectories than two (the sums of the gradients round
differently), so read its figures as a recipe's spread, not as the pipeline's numbers.

    .venv/bin/python -m benchmarks._rm_recipe_sweep --seeds 0 1 2 3 --set model.tiny.num_layers=2 ...

Prints one JSON line per seed: SFT held-out token accuracy, the reward model's held-out pairwise
accuracy every `--every` steps and at the end, its reward gap and final training loss.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "three_stage.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--every", type=int, default=100, help="held-out evaluation every this many reward-model steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", nargs="*", default=[])
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from rlhf_cluster.config import load_config

    torch.set_num_threads(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1)
    work = Path(tempfile.mkdtemp(prefix="rm-sweep-"))
    for seed in args.seeds:
        sets = [f"run_dir={work / f'seed{seed}'}", f"model.cache_dir={work / 'models'}", f"seed={seed}"]
        cfg = load_config(str(args.config), [*sets, "sft.world_size=1", "reward_model.world_size=1", *args.overrides])
        start = time.perf_counter()
        row = {"seed": seed, "overrides": args.overrides, **both_stages(cfg, args.every)}
        print(json.dumps({**row, "seconds": round(time.perf_counter() - start)}), flush=True)
    dist.destroy_process_group()
    return 0


def both_stages(cfg, every: int) -> dict:
    """SFT from the tiny model, then the reward model from it, in this process: the figures of one seed."""
    from transformers import AutoTokenizer

    from actors.commands.supervised import _batches, _rm_data, _sft_data
    from rlhf_cluster.learner.supervised import SupervisedTrainer
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    base = str(ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad = tokenizer.pad_token_id or 0
    train, evals = _sft_data(cfg, cfg.sft, tokenizer)
    sft = SupervisedTrainer("sft", base, cfg.sft, pad)
    for idx in _batches(len(train), cfg.sft.batch_size, cfg.sft.steps, cfg.sft.seed):
        sft.sft_step([train[i] for i in idx])
    sft_eval = sft.sft_evaluate(evals)
    sft_dir = sft.save(cfg.stage_output("sft"), base, base)
    assert sft_dir is not None  # rank 0 (the only one) writes the folder

    stage = cfg.reward_model
    train, pairs = _rm_data(cfg, stage, tokenizer)
    rm = SupervisedTrainer("reward_model", sft_dir, stage, pad)
    curve = []
    for step, idx in enumerate(_batches(len(train), stage.batch_size, stage.steps, stage.seed)):
        items = [train[i] for i in idx]
        metrics = rm.rm_step(
            [e.chosen for e in items],
            [e.rejected for e in items],
            [e.margin for e in items],
            [e.prompt_length for e in items],
        )
        if (step + 1) % every == 0 and step + 1 < stage.steps:
            curve.append(f"{step + 1}:{held_out(rm, pairs)[0]:.2f}")
    accuracy, gap = held_out(rm, pairs)
    return {
        "sft_eval_token_accuracy": round(sft_eval["eval_token_accuracy"], 3),
        "accuracy": round(accuracy, 3),
        "reward_gap": round(gap, 2),
        "final_loss": round(metrics["loss"], 3),
        "held_out_by_step": " ".join(curve),
    }


def held_out(rm, pairs: list) -> tuple[float, float]:
    """The reward model's pairwise accuracy on the held-out pairs, and its mean reward gap."""
    n = len(pairs)
    s = rm.rm_scores([e.chosen for e in pairs] + [e.rejected for e in pairs])
    return sum(c > r for c, r in zip(s[:n], s[n:])) / n, sum(c - r for c, r in zip(s[:n], s[n:])) / n


if __name__ == "__main__":
    sys.exit(main())
