"""The state of one job that a checkpoint captures beside the ranks' own: prompt order and
admission, the experience buffer, the KL controller and the drop counters. Ray-free."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_cluster.admission import Admission
from rlhf_cluster.buffer import ExperienceBuffer
from rlhf_cluster.checkpoint import Checkpoint
from rlhf_cluster.config import JobConfig
from rlhf_cluster.data.prompts import Prompt, PromptSource
from rlhf_cluster.experience import accept_group, kl_controller
from rlhf_cluster.records import ScoredSample
from rlhf_cluster.run_dir import RunDir


class JobState:
    """Everything between generation and the learner that must survive a restart."""

    def __init__(self, cfg: JobConfig, prompts: list[Prompt]):
        self.cfg = cfg
        source = PromptSource(prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.admission = Admission(cfg.train, cfg.generation, source)
        self.buffer = ExperienceBuffer(cfg.buffer.capacity)
        self.kl = kl_controller(cfg.algorithm.kl)
        self.zero_signal_dropped = 0
        self.start_step = 0
        self.worker_of: dict[str, str] = {}  # sample id -> the generation worker that produced it

    def add_group(self, samples: list[ScoredSample], metrics: dict[str, float], worker: str) -> bool:
        """Buffer one scored group, or drop it (dynamic sampling: no signal) and give its
        admission back; returns whether it was buffered."""
        if not accept_group(metrics, self.cfg.algorithm):
            self.admission.give_back(1)
            self.zero_signal_dropped += len(samples)
            return False
        self.buffer.add_group(samples)
        self.worker_of.update((s.sample_id, worker) for s in samples)
        return True

    def counters(self) -> dict[str, int]:
        """The buffer's depth and drops, for the step's row."""
        return {"buffer_depth": self.buffer.depth, "dropped_stale": self.buffer.dropped["stale"],
                "dropped_zero_signal": self.zero_signal_dropped}

    def take(self, step: int) -> tuple[list[ScoredSample] | None, int]:
        """The step's groups if enough admissible ones are buffered (else None), and how many
        samples were dropped as stale on the way; dropped groups give their admission back."""
        t = self.cfg.train
        before = self.buffer.dropped["stale"]
        samples = self.buffer.take(t.prompts_per_step, min_version=step - t.max_staleness)
        dropped = self.buffer.dropped["stale"] - before
        self.admission.give_back(dropped // self.cfg.generation.sampling.n)
        return samples, dropped

    def save(self, step: int, directory: Path) -> None:
        """Write this half of a checkpoint after `step`: the state JSON and the buffer."""
        state = {
            "step": step,
            "version": step + 1,
            "kl": self.kl.state_dict(),
            **self.admission.state_dict(),
            "zero_signal_dropped": self.zero_signal_dropped,
            "dropped": dict(self.buffer.dropped),
        }
        (directory / RunDir.DRIVER_STATE).write_text(json.dumps(state))
        self.buffer.save(directory / RunDir.CHECKPOINT_BUFFER)

    def load(self, ckpt: Checkpoint) -> None:
        """Continue from `ckpt` (on a fresh JobState): the next step is the one after it."""
        state = ckpt.driver_state()
        self.buffer.load(ckpt.path / RunDir.CHECKPOINT_BUFFER)
        self.buffer.dropped.update(state["dropped"])
        self.kl.load_state_dict(state["kl"])
        self.zero_signal_dropped = state["zero_signal_dropped"]
        self.start_step = ckpt.step + 1
        groups_done = self.start_step * self.cfg.train.prompts_per_step + self.buffer.ready_groups()
        self.admission.load_state_dict(state, groups_done)
