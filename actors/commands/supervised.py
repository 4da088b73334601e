"""Supervised stages on Ray: `rlhf-cluster sft` and `rlhf-cluster train-rm`.

The driver here tokenises the data, deals each step's examples round-robin to the FSDP2 ranks
(gang-placed like the RL learner), evaluates on held-out examples and has rank 0 write the model
folder. The stage's summary goes to `OUTPUT/stage.json` beside the model.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from tqdm import tqdm

from actors.workers._common import join_process_group, limit_threads, rendezvous_address
from actors.workers.rank_group import RankGroup, deal
from rlhf_cluster.config import JobConfig, StageConfig
from rlhf_cluster.data.preferences import arithmetic_preference_pairs, encode_response, read_preference_file
from rlhf_cluster.data.sft import SFTExample, read_sft_file, tokenize_conversation, tokenize_plain
from rlhf_cluster.data.tasks import arithmetic_rows, held_out_pairs
from rlhf_cluster.fileio import write_atomic
from rlhf_cluster.learner.supervised import SupervisedTrainer, length_correlation

EVAL_PAIRS_PER_PROMPT = 4


@ray.remote
class SupervisedRank:
    """One rank of a supervised stage (a `SupervisedTrainer` in its own process)."""

    def __init__(self, kind: str, model_path: str, stage_dict: dict, rank: int, world_size: int, pad_id: int):
        self.kind, self.model_path, self.rank, self.world_size, self.pad_id = kind, model_path, rank, world_size, pad_id
        self.stage = StageConfig.model_validate(stage_dict)
        self.trainer: SupervisedTrainer | None = None
        limit_threads(world_size + 1)

    def address(self) -> tuple[str, int]:
        return rendezvous_address()

    def setup(self, master_addr: str, master_port: int) -> dict:
        join_process_group(master_addr, master_port, self.rank, self.world_size)
        self.trainer = SupervisedTrainer(self.kind, self.model_path, self.stage, self.pad_id)
        return {"name": f"rank{self.rank}", "metrics": None, "pid": os.getpid()}

    def _set_up(self) -> SupervisedTrainer:
        """The trainer `setup` built: a call before it is the driver's bug."""
        if self.trainer is None:
            raise RuntimeError(f"supervised rank {self.rank}: called before setup()")
        return self.trainer

    def sft_step(self, examples: list[SFTExample]) -> dict:
        return self._set_up().sft_step(examples)

    def sft_evaluate(self, examples: list[SFTExample]) -> dict:
        return self._set_up().sft_evaluate(examples)

    def rm_step(
        self, chosen: list[list[int]], rejected: list[list[int]], margins: list[float], prompt_lengths: list[int]
    ) -> dict:
        return self._set_up().rm_step(chosen, rejected, margins, prompt_lengths)

    def rm_scores(self, sequences: list[list[int]]) -> list[float]:
        return self._set_up().rm_scores(sequences)

    def save(self, output: str) -> str | None:
        return self._set_up().save(output, self.model_path, self.model_path)


def _sft_data(cfg: JobConfig, stage: StageConfig, tokenizer) -> tuple[list[SFTExample], list[SFTExample]]:
    if stage.path is not None:
        examples = [tokenize_conversation(tokenizer, m) for m in read_sft_file(stage.path)]
        cut = len(examples) - min(stage.eval_examples, len(examples) // 5)
        return examples[:cut], examples[cut:]
    d = cfg.data
    assert d.seed is not None  # JobConfig resolves every component seed when it validates
    train = [
        tokenize_plain(tokenizer, r["prompt"], r["answer"])
        for r in arithmetic_rows(stage.num_examples, d.seed, "train", d.max_operand)
    ]
    held = min(stage.eval_examples, held_out_pairs(d.max_operand))
    evals = [
        tokenize_plain(tokenizer, r["prompt"], r["answer"])
        for r in arithmetic_rows(held, d.seed, "eval", d.max_operand)
    ]
    return train, evals


def _rm_data(cfg: JobConfig, stage: StageConfig, tokenizer):
    if stage.path is not None:
        pairs = read_preference_file(stage.path)
        cut = len(pairs) - min(stage.eval_examples, len(pairs) // 5)
        train, evals = pairs[:cut], pairs[cut:]
    else:
        d = cfg.data
        assert d.seed is not None  # JobConfig resolves every component seed when it validates
        train = arithmetic_preference_pairs(stage.num_examples, d.seed, "train", d.max_operand)
        # Every held-out prompt (up to eval_examples) with EVAL_PAIRS_PER_PROMPT wrong answers.
        evals = arithmetic_preference_pairs(
            min(stage.eval_examples, held_out_pairs(d.max_operand)),
            d.seed,
            "eval",
            d.max_operand,
            per_prompt=EVAL_PAIRS_PER_PROMPT,
        )

    def encode(pairs):
        out = []
        for p in pairs:
            prompt_len = len(tokenizer(p.prompt, add_special_tokens=False)["input_ids"])
            chosen, rejected = (
                encode_response(tokenizer, p.prompt, p.chosen),
                encode_response(tokenizer, p.prompt, p.rejected),
            )
            out.append(EncodedPair(chosen, rejected, p.margin, len(chosen) - prompt_len, len(rejected) - prompt_len))
        return out

    return encode(train), encode(evals)


@dataclass
class EncodedPair:
    """A preference pair as token ids (prompt + response + EOS each), with response lengths."""

    chosen: list[int]
    rejected: list[int]
    margin: float
    chosen_response_len: int
    rejected_response_len: int

    @property
    def prompt_length(self) -> int:
        return len(self.chosen) - self.chosen_response_len


def _batches(n_items: int, batch_size: int, steps: int, seed: int):
    """Index batches for `steps` steps: epochs of a seeded shuffle, no example twice in an epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            epoch = list(range(n_items))
            rng.shuffle(epoch)
            order += epoch
        yield order[:batch_size]
        order = order[batch_size:]


def run_stage(cfg: JobConfig, kind: str, model_path: str, progress: bool = True) -> dict:
    """Train the `sft` or `reward_model` stage from `model_path`; returns the summary it writes."""
    from transformers import AutoTokenizer

    stage: StageConfig | None = getattr(cfg, kind)
    if stage is None:
        raise ValueError(f"the config has no `{kind}` section; add one (see configs/three_stage.yaml)")
    assert stage.seed is not None  # JobConfig resolves every component seed when it validates
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, evals = (_sft_data if kind == "sft" else _rm_data)(cfg, stage, tokenizer)
    if not train:
        raise ValueError(f"{kind}: no training examples")
    world = stage.world_size
    pad_id = tokenizer.pad_token_id or 0
    group = RankGroup(
        SupervisedRank,
        lambda r: (kind, model_path, stage.model_dump(), r, world, pad_id),
        stage.resources,
        world,
        section=kind,
    )
    try:
        start = time.perf_counter()
        history = []
        bar = tqdm(total=stage.steps, desc=kind, disable=not progress, dynamic_ncols=True)
        for step, idx in enumerate(_batches(len(train), stage.batch_size, stage.steps, stage.seed)):
            metrics = _train_step(kind, group, [train[i] for i in idx])
            history.append({"step": step, **metrics})
            if stage.eval_every_steps and (step + 1) % stage.eval_every_steps == 0 and step + 1 < stage.steps:
                history[-1].update(_evaluate(kind, group, evals))
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        bar.close()
        summary = {
            "stage": kind,
            "base_model": model_path,
            "steps": stage.steps,
            "train_examples": len(train),
            "eval_examples": len(evals),
            "seconds": time.perf_counter() - start,
            "first_loss": history[0]["loss"],
            "final_loss": history[-1]["loss"],
        }
        summary.update(_evaluate(kind, group, evals))
        history[-1].update({k: v for k, v in summary.items() if k.startswith("eval_")})
        output = cfg.stage_output(kind)
        group.call("save", str(output))
    finally:
        group.kill()
    summary["output"] = str(output)
    write_atomic(Path(output) / "stage.json", json.dumps({**summary, "history": history}, indent=1))
    return summary


def _train_step(kind: str, group: RankGroup, items: list) -> dict:
    """One optimizer step of every rank over its share of `items` (SFT examples or encoded
    preference pairs); rank 0's metrics."""
    shares = deal(items, group.world_size)
    if kind == "sft":
        return ray.get(group.split("sft_step", shares))[0]
    return ray.get(
        [
            rank.rm_step.remote(
                [p.chosen for p in share],
                [p.rejected for p in share],
                [p.margin for p in share],
                [p.prompt_length for p in share],
            )
            for rank, share in zip(group.ranks, shares)
        ]
    )[0]


def _evaluate(kind: str, group: RankGroup, evals: list) -> dict:
    if not evals:
        return {}
    if kind == "sft":
        return ray.get(group.split("sft_evaluate", deal(evals, group.world_size)))[0]
    sequences = [p.chosen for p in evals] + [p.rejected for p in evals]
    lengths = [p.chosen_response_len for p in evals] + [p.rejected_response_len for p in evals]
    scores = group.run("rm_scores", sequences)
    n = len(evals)
    return {
        "eval_pairwise_accuracy": sum(c > x for c, x in zip(scores[:n], scores[n:])) / n,
        "eval_reward_gap": sum(c - x for c, x in zip(scores[:n], scores[n:])) / n,
        "eval_length_correlation": length_correlation(scores, lengths),
    }
