"""The job's worker pools as a table: one row per pool, built from the job's config. `Cluster`
starts, scales and watches whatever rows the job runs; `ScoringCalls` joins the calls of the rows
that say how. A new pool is one row here (and its worker class, `actors/workers/_common.Worker`).

Every pool worker is built as `worker(settings, model_path, index, slot)`: its settings (never the
whole job), the model folder it loads (None: none), its index (its name is `<prefix><index>`,
never reused) and its slot (the index of the worker it stands in for, so per-replica settings
survive restarts).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Literal

from actors.workers.generation import GenerationWorker
from actors.workers.judge import JudgeWorker
from actors.workers.pools import ActorPool, actor_options
from actors.workers.scoring import ReferenceWorker, RewardWorker, TeacherWorker
from actors.workers.settings import GenerationSettings, JudgeSettings, ScoringSettings
from rlhf_cluster.config import FaultsConfig, JobConfig, ResourcesConfig
from rlhf_cluster.models.quantization import int8_copy
from rlhf_cluster.telemetry.tracing import PoolActivity


@dataclass(frozen=True)
class PoolRow:
    """One pool: its name (metric labels, `rlhf-cluster scale --pool`, busy shares, events), its
    workers' name prefix and class, what each worker is built from, how many start, and the
    resources each asks of Ray."""

    name: str
    prefix: str
    worker: Any  # a @ray.remote worker class (an ActorClass, which mypy cannot see through)
    settings: Callable[[], Any]  # built when a worker starts: a row the job does not run builds nothing
    replicas: int
    resources: ResourcesConfig
    model_path: Callable[[int], str | None] = lambda slot: None  # the folder a worker in `slot` loads
    runs: bool = True  # whether this job runs the pool at all
    # Scoring calls that wait for a free worker leave together as one call, at most this many
    # items (a step's samples); None: every call alone.
    joined: int | None = None
    # What a new worker takes before it serves: "weights", the newest weight version (the job's
    # `WeightSync`); "reference", the KL reference's current folder (`ReferenceRefresh`); None: nothing.
    prepared_by: Literal["weights", "reference"] | None = None
    spares: int = 0  # warm spares: started and prepared, out of rotation, standing in for a lost worker
    # What a spare shares with the worker it stands in for; None: the folder its slot loads. The
    # reference's folder moves for every worker and spare at once (its refreshes): one kind, and
    # asking it never hands a folder out (`ReferenceRefresh.model_path` records who may be reading).
    kind: Callable[[int], Any] | None = None

    @property
    def takes_weights(self) -> bool:
        return self.prepared_by == "weights"

    def kind_of(self, slot: int) -> Any:
        return (self.kind or self.model_path)(slot)

    def create(self, index: int, slot: int) -> Any:
        """Start one worker (its constructor runs in its own process)."""
        return self.worker.options(**actor_options(self.resources)).remote(
            self.settings(), self.model_path(slot), index, slot
        )

    def pool(
        self,
        faults: FaultsConfig,
        activity: PoolActivity,
        on_restart: Callable[[str, str, str, bool], None],
        prepares: Mapping[str, Callable[[Any], Awaitable[None]]],
        on_spares: Callable[[str, str | None], Awaitable[None]],
    ) -> ActorPool:
        """The row's `ActorPool` (no worker started yet); `prepares[prepared_by]` runs on every new
        worker before it serves (the job's weight sync, or the reference's refresh); `on_restart(pool, dead,
        new, spare)` after a worker was replaced, `on_spares(pool, lost)` after its spares changed
        (the name of a spare lost, or None). A spare stands in for a worker whose slot loads the
        same model folder."""
        return ActorPool(
            self.name,
            self.prefix,
            self.create,
            prepare=prepares[self.prepared_by] if self.prepared_by else None,
            max_restarts=faults.max_worker_restarts,
            backoff_s=faults.restart_backoff_s,
            activity=activity,
            on_restart=partial(on_restart, self.name),
            spares=self.spares,
            kind_of=self.kind_of,
            on_spares=partial(on_spares, self.name),
        )


def judge_model_path(cfg: JobConfig, int8_dir: Path) -> str:
    """What judge engines start from: the judge's folder, or its int8 copy (written once, to `int8_dir`)."""
    judge = cfg.scoring.judge_source
    assert judge is not None
    if judge.quantization != "int8":
        return judge.model
    import torch

    return str(int8_copy(judge.model, getattr(torch, cfg.engine_dtype), int8_dir))


def pool_rows(
    cfg: JobConfig,
    model_path: str,
    engine_paths: dict[str, str],
    judge_int8_dir: Path,
    reference_path: Callable[[int], str] | None = None,
) -> list[PoolRow]:
    """The pools this job runs, generation first. `model_path`: the policy's folder (the
    reference's, unless `reference_path` says where a reference worker starts from: a refreshed
    reference's folder); `engine_paths`: what generation engines start from, by weight variant;
    `judge_int8_dir`: where an int8 judge's copy goes."""
    g, s, step = cfg.generation, cfg.scoring, cfg.samples_per_step
    # With LoRA the learner's base model (adapters off) is the reference: no copy to run. With
    # distillation the teacher's pool takes the reference's place (preflight refuses it beside LoRA).
    log_probs, teacher = s.reference and not cfg.learner.lora.enabled, cfg.algorithm.distillation
    judge_path = cache(lambda: judge_model_path(cfg, judge_int8_dir))
    rows = [
        PoolRow(
            "generation", "gen", GenerationWorker, lambda: GenerationSettings.of(cfg), g.replicas, g.resources,
            model_path=lambda slot: engine_paths["int8" if g.quantization_of(slot) == "int8" else "full"],
            prepared_by="weights", spares=g.spares,
        ),
        PoolRow("reward", "reward", RewardWorker, lambda: ScoringSettings.of(cfg), s.reward_replicas, s.resources,
                joined=step, spares=s.spares),
        PoolRow(
            "reference", "ref", ReferenceWorker, lambda: ScoringSettings.of(cfg), s.reference_replicas, s.resources,
            model_path=reference_path or (lambda _: model_path), runs=log_probs and teacher is None, joined=step,
            spares=s.spares, prepared_by="reference", kind=lambda _: "reference",
        ),
        PoolRow(
            "teacher", "teacher", TeacherWorker, lambda: ScoringSettings.of(cfg), s.reference_replicas, s.resources,
            model_path=lambda _: teacher.teacher if teacher else None, runs=log_probs and teacher is not None,
            joined=step, spares=s.spares,
        ),
        # A judge model's verdicts as a reward; a group judge gets each group whole (calls are joined, never split).
        PoolRow(
            "judge", "judge", JudgeWorker, lambda: JudgeSettings.of(cfg), s.judge_replicas, s.resources,
            model_path=lambda _: judge_path(), runs=s.judge_source is not None, joined=step, spares=s.spares,
        ),
    ]  # fmt: skip
    return [row for row in rows if row.runs]
