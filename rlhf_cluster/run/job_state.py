"""The state of one job that a checkpoint captures beside the ranks' own: prompt order and
admission, the experience buffer, the KL controller and the drop counters. Ray-free.

Also what keeps the job from spinning without progress: a sample whose reward failed is dropped
alone (its group keeps the rest when `min_group_size` remain), and the no-progress watchdog
(`liveness.ProgressWatchdog`) ends a step loop that waits too long for its batch, saying why.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

from rlhf_cluster.config import JobConfig
from rlhf_cluster.config.algorithm import GROUP_ADVANTAGES
from rlhf_cluster.data.prompts import Prompt, PromptSource
from rlhf_cluster.experience.admission import Admission
from rlhf_cluster.experience.buffer import STALE, ExperienceBuffer
from rlhf_cluster.experience.build import accept_group, kl_controller
from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.run.checkpoint import Checkpoint
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import BUFFERED, ScoredLog
from rlhf_cluster.scoring.rewards import FAILED
from rlhf_cluster.telemetry.liveness import NoProgressError, ProgressWatchdog

# Settings a resume may change (`--resume auto --set learner.lr=...`): the job's value replaces
# the checkpoint's. Others that a step reads from the config (clip ranges, loss settings) apply
# by themselves; these are the ones a checkpoint also holds as state.
RESUME_SETTINGS = (
    "learner.lr",
    "learner.weight_decay",
    "learner.lr_warmup_steps",
    "learner.lr_schedule",
    "learner.min_lr_ratio",
    "algorithm.kl.coef",
    "algorithm.kl.target",
    "algorithm.kl.horizon",
    "algorithm.loss.clip_low",
    "algorithm.loss.clip_high",
    "learner.max_grad_norm",
)


def reward_failed(reward: float, components: dict[str, float]) -> bool:
    """Whether a sample's reward failed: its reward function failed (`on_error: drop` marks it) or
    its reward is not finite (e.g. a reward model's NaN). Nothing is trained on such a sample."""
    return bool(components.get(FAILED, 0.0)) or not math.isfinite(reward)


def min_group_size(cfg: JobConfig) -> int:
    """The fewest samples a group may keep once its failed ones are left out: 2 for a group-relative
    advantage (grpo, dr_grpo, rloo: each sample's baseline comes from the others), and enough that
    a step of `prompts_per_step` such groups still gives every learner (and critic) rank a sample
    per mini-batch; never more than the group's size."""
    need = 2 if cfg.algorithm.advantage in GROUP_ADVANTAGES else 1
    groups = [cfg.learner] + ([cfg.critic.learner_settings()] if cfg.critic is not None else [])
    per_step = max(g.world_size * g.mini_batches for g in groups)
    need = max(need, -(-per_step // cfg.train.prompts_per_step))
    return min(need, cfg.generation.sampling.n)


def kept_samples(scores: list[tuple[float, dict[str, float]]], at_least: int) -> list[int]:
    """Positions of a group's samples to build the group from (before its advantages): those whose
    reward did not fail when at least `at_least` remain, else all of them (a group that still
    holds a failed sample is dropped whole by `JobState.add_group`, and counted)."""
    ok = [i for i, (reward, components) in enumerate(scores) if not reward_failed(reward, components)]
    return ok if len(ok) >= at_least else list(range(len(scores)))


def settings_of(cfg: JobConfig) -> dict[str, object]:
    """The RESUME_SETTINGS values of `cfg` (None where a field does not apply)."""
    out = {}
    for name in RESUME_SETTINGS:
        value: object = cfg
        for part in name.split("."):
            value = getattr(value, part, None)
        out[name] = value
    return out


class JobState:
    """Everything between generation and the learner that must survive a restart."""

    def __init__(self, cfg: JobConfig, prompts: list[Prompt]):
        self.cfg = cfg
        assert cfg.data.seed is not None  # JobConfig resolves every component seed when it validates
        source = PromptSource(prompts, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        self.admission = Admission(cfg.train, cfg.generation, source)
        self.buffer = ExperienceBuffer(cfg.buffer.capacity)
        self.kl = kl_controller(cfg.algorithm.kl)
        self.dropped = {"zero_signal": 0, "reward_failed": 0}  # samples of groups dropped before the buffer
        self.start_step = 0
        self.overrides: dict[str, tuple[object, object]] = {}  # setting -> (checkpoint's, this job's), on resume
        self.worker_of: dict[str, str] = {}  # sample id -> the generation worker that produced it
        self.log = ScoredLog(Path(cfg.run_dir).expanduser() / RunDir.SCORED_LOG)
        self.recovered = {
            "reused": 0,
            "rolled_back": 0,
            "stale": 0,
        }  # scored groups found in the log on resume (from abandoned weights; too stale to train on)
        f = cfg.faults
        self.watchdog = ProgressWatchdog(f.progress_timeout_s, f.progress_timeout_factor)
        # What happened since the last batch was formed, for the watchdog's message.
        self.since_progress: Counter[str] = Counter()

    def add_group(
        self, samples: list[ScoredSample], metrics: dict[str, float], worker: str, failed: int = 0
    ) -> str | None:
        """Buffer one scored group, or drop it and give its admission back; returns None when
        buffered, else why it was dropped: `reward_failed` (a sample's reward function failed or
        its reward is not finite: nothing is trained on it) or `zero_signal` (dynamic sampling).
        `failed`: samples of the group the caller already left out because their reward failed
        (`kept_samples`; the group's advantages are over the rest); they count as dropped."""
        self.dropped["reward_failed"] += failed
        self.since_progress["samples whose reward failed"] += failed
        if any(reward_failed(s.reward, s.reward_components) for s in samples):
            reason = "reward_failed"
        elif not accept_group(metrics, self.cfg.algorithm):
            reason = "zero_signal"
        else:
            reason = None
        self._keep(samples, reason, worker, failed)
        self.since_progress[f"groups dropped ({reason})" if reason else "groups buffered"] += 1
        if reason is not None:
            self.admission.give_back(1)
        return reason

    def _keep(self, samples: list[ScoredSample], dropped: str | None, worker: str, failed: int) -> None:
        """Log a scored group (with its `failed` count), then buffer it (or count its drop)."""
        self.log.append(samples, dropped or BUFFERED, failed)
        self._hold(samples, dropped, worker)

    def _hold(self, samples: list[ScoredSample], dropped: str | None, worker: str) -> None:
        if dropped is None:
            self.buffer.add_group(samples)
            self.worker_of.update((s.sample_id, worker) for s in samples)
        else:
            self.dropped[dropped] += len(samples)

    def counters(self) -> dict[str, int]:
        """The buffer's depth and drops, for the step's row."""
        return {
            "buffer_depth": self.buffer.depth,
            "dropped_stale": self.buffer.dropped[STALE],
            "dropped_zero_signal": self.dropped["zero_signal"],
            "dropped_reward_failed": self.dropped["reward_failed"],
        }

    def take(self, step: int) -> tuple[list[ScoredSample] | None, int]:
        """The step's groups if enough admissible ones are buffered (else None), and how many
        samples were dropped as stale on the way; dropped groups give their admission back.
        Raises `NoProgressError` (saying why) when the step has waited past the watchdog's bound."""
        t = self.cfg.train
        before, groups_before = self.buffer.dropped[STALE], self.buffer.ready_groups()
        samples = self.buffer.take(t.prompts_per_step, min_version=step - t.max_staleness)
        dropped = self.buffer.dropped[STALE] - before
        # Groups, not samples / n: a group may have kept only some of its samples.
        stale_groups = groups_before - self.buffer.ready_groups() - (t.prompts_per_step if samples is not None else 0)
        self.admission.give_back(stale_groups)
        self.since_progress["groups dropped (stale)"] += stale_groups
        if samples is not None:
            self.watchdog.progressed()
            self.since_progress.clear()
        else:
            self.watchdog.waiting()
            self._check_progress(step)
        return samples, dropped

    def _check_progress(self, step: int) -> None:
        waited = self.watchdog.overdue_s()
        if waited is None:
            return
        t = self.cfg.train
        seen = ", ".join(f"{n} {what}" for what, n in sorted(self.since_progress.items()) if n) or "no group arrived"
        raise NoProgressError(
            f"no learner step for {waited:.0f} s ({self.watchdog.explain()}): step {step} waits for "
            f"{t.prompts_per_step} groups sampled at version >= {step - t.max_staleness}, the buffer holds "
            f"{self.buffer.ready_groups()} ({self.buffer.depth} samples), {len(self.admission.in_flight)} requests are "
            f"in flight; since the last step: {seen}. Every group being dropped means no batch can form: check the "
            "reward function (scoring.rewards on_error, max_failure_fraction), algorithm.shaping.dynamic_sampling "
            "and the generation workers' logs"
        )

    def save(self, step: int, directory: Path) -> None:
        """Write this half of a checkpoint after `step`: the state JSON and the buffer; the scored
        log is flushed, so the checkpoint's seq falls between two of its segments."""
        self.log.flush()
        state = {
            "scored_seq": self.log.next_seq,
            "step": step,
            "version": step + 1,
            "kl": self.kl.state_dict(),
            **self.admission.state_dict(),
            "zero_signal_dropped": self.dropped["zero_signal"],
            "reward_failed_dropped": self.dropped["reward_failed"],
            "dropped": dict(self.buffer.dropped),
            "settings": settings_of(self.cfg),
        }
        (directory / RunDir.DRIVER_STATE).write_text(json.dumps(state))
        self.buffer.save(directory / RunDir.CHECKPOINT_BUFFER)

    def load(self, ckpt: Checkpoint) -> None:
        """Continue from `ckpt` (on a fresh JobState): the next step is the one after it."""
        state = ckpt.driver_state()
        self.buffer.load(ckpt.path / RunDir.CHECKPOINT_BUFFER)
        self.buffer.dropped.update(state["dropped"])
        self.kl.load_state_dict(state["kl"])
        saved, now = state.get("settings", {}), settings_of(self.cfg)
        self.overrides = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if any(k.startswith("algorithm.kl.") for k in self.overrides):
            self.kl.override(self.cfg.algorithm.kl, coef="algorithm.kl.coef" in self.overrides)
        self.dropped["zero_signal"] = state["zero_signal_dropped"]
        self.dropped["reward_failed"] = state.get("reward_failed_dropped", 0)  # absent from older checkpoints
        self.start_step = ckpt.step + 1
        recovered = self._recover(state.get("scored_seq"), ckpt.version)
        groups_done = self.start_step * self.cfg.train.prompts_per_step + self.buffer.ready_groups()
        self.admission.load_state_dict(state, groups_done)
        for prompt_id in recovered:
            self.admission.skip(prompt_id)

    def _recover(self, seq: int | None, version: int) -> list[str]:
        """Every group scored after the checkpoint (the log from `seq` on) is reused as if it had
        just arrived, so nothing scored is generated again. A group sampled by weights newer than
        the checkpoint's `version` came from steps the rollback abandons: it keeps its versions
        (the truth about what sampled it) and counts those steps in `rolled_back_steps`, so the
        staleness bound sees how far its weights are from the learner's. One already too stale
        for the next step is counted as dropped (stale), not buffered: after a long stretch
        without a checkpoint (a full disk fails them) the log can hold more groups than the
        buffer's capacity. The log keeps them as they are. Returns the reused groups' prompt ids."""
        if seq is None:  # a checkpoint from before the log: everything after it is generated again
            return []
        min_version = self.start_step - self.cfg.train.max_staleness
        reused = []
        for fate, logged, failed in self.log.resume_from(seq):
            self.dropped["reward_failed"] += failed  # counted by the run that logged it, after the checkpoint
            samples = [roll_back(s, version) for s in logged]
            if any(s.rolled_back_steps for s in samples):
                self.recovered["rolled_back"] += 1
            reused.append(samples[0].prompt_id)
            if fate == BUFFERED and self.buffer.refuse_stale(samples, min_version):
                self.recovered["stale"] += 1
                continue
            self._hold(samples, None if fate == BUFFERED else fate, "recovered")
        self.recovered["reused"] = len(reused)
        return reused


def roll_back(sample: ScoredSample, version: int) -> ScoredSample:
    """`sample` after a rollback to weight `version`: the weights it was sampled by share the
    learner's history up to the older of `version` and the point they shared before."""
    shared = min(sample.newest_version - sample.rolled_back_steps, version)
    return dataclasses.replace(sample, rolled_back_steps=sample.newest_version - shared)
