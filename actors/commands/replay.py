"""Replay: train a recorded run's steps again on a fresh learner, from the groups it recorded
(`train.record_rollouts`), with no generation or scoring; returns each rank's state digest, the
same digest a checkpoint records, so a replay can be compared with another one or with the run."""

from __future__ import annotations

import asyncio
from pathlib import Path

from actors.trainer import Trainer
from rlhf_cluster.experience.build import kl_controller, observe_step_kl
from rlhf_cluster.job.guardrails import policy_held
from rlhf_cluster.job.inputs import prepare_inputs
from rlhf_cluster.run.checkpoint import CheckpointStore
from rlhf_cluster.run.replay import recorded_batches, recorded_config
from rlhf_cluster.run.run_dir import RunDir


def replay(run_dir: Path, out_dir: Path, steps: tuple[int, int] | None = None) -> dict:
    """Train steps A..B of the run in `run_dir` (all by default) again; writes only under `out_dir`.

    From step 0 the learner starts from the run's initial weights; from step A > 0 it restores
    the run's checkpoint of step A - 1 (learner state and KL controller). Returns the steps, each
    rank's digest after the last one, and the run's own digests at that step when it kept a
    checkpoint there.
    """
    recorded = recorded_config(run_dir)
    batches = recorded_batches(run_dir, steps)
    first, last = min(batches), max(batches)
    store = CheckpointStore(recorded.checkpoint_dir)
    kept = {c.step: c for c in map(CheckpointStore.verify, store.list())}
    if first > 0 and first - 1 not in kept:
        raise ValueError(
            f"steps {first}..{last}: starting after step 0 needs the run's checkpoint of step {first - 1}; "
            f"it kept steps {sorted(kept)}"
        )
    # Everything the replay writes (prompt files, the weight store) goes under out_dir.
    cfg = recorded.model_copy(
        update={
            "run_dir": str(out_dir),
            "weights": recorded.weights.model_copy(update={"dir": None}),
            "checkpoint": recorded.checkpoint.model_copy(update={"dir": None}),
        }
    )
    run = RunDir(out_dir, cfg.weights_dir, cfg.checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(cfg, run)
    trainer = Trainer(cfg, inputs.model_path, None)
    kl = kl_controller(cfg.algorithm.kl)
    try:
        if first > 0:
            trainer.load_checkpoint(kept[first - 1].path)
            kl.load_state_dict(kept[first - 1].driver_state()["kl"])

        async def train_all() -> None:
            for step in range(first, last + 1):
                stats, published = await trainer.train(step, batches[step], kl.value)
                await published
                if not policy_held(stats):  # as the driver: a critic warm-up step's KL is not the policy's
                    observe_step_kl(kl, stats["policy/kl"], batches[step])

        asyncio.run(train_all())
        digests = trainer.policy.call("state_digest", timeout=600)
    finally:
        trainer.kill()
    original = kept.get(last)
    return {
        "steps": [first, last],
        "rank_digests": digests,
        "run_rank_digests": None if original is None else original.manifest["rank_digests"],
    }
