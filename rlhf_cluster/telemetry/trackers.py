"""Experiment trackers: each learner step's row (what `metrics.jsonl` holds) also to TensorBoard
(`metrics.tensorboard`: event files in `<run_dir>/tensorboard`) and Weights & Biases
(`metrics.wandb`: a run in its project, the job's config as the run's config), as veRL's
`trainer.logger`, OpenRLHF's `--logger.*` and slime's `--use-wandb` do. Ray-free; each package is
imported only where its tracker is on (the `tracking` extra installs both).

The x axis is the learner step, a column of every row (`step`), not the tracker's own counter: a
resumed run logs again the steps after its checkpoint (the killed run's rows of those steps stay
in W&B beside them; TensorBoard drops its own, `purge_step`). A W&B run resumes as the same run:
its id is kept in `<run_dir>/wandb_run_id`, set aside with the run's other logs on a fresh start.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any, Protocol

from rlhf_cluster.config import JobConfig

# What the trackers write in the run directory (`RunDir` names them among a run's artifacts).
TENSORBOARD_DIR = "tensorboard"  # TensorBoard's event files
WANDB_DIR = "wandb"  # W&B's run files, its own layout
WANDB_ID = "wandb_run_id"  # the W&B run a resume continues


class Tracker(Protocol):
    def log(self, row: dict[str, Any], step: int) -> None: ...

    def rewind(self, first_step: int) -> None:
        """The run continues from `first_step` (a rollback, a rebuilt learner): rows logged again."""

    def close(self) -> None: ...


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers (booleans as 0/1): what a tracker charts."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class TensorBoardTracker:
    """Scalars to `<run_dir>/tensorboard`; a resume drops the events of the steps it logs again."""

    def __init__(self, run_dir: Path, first_step: int):
        self.folder = run_dir / TENSORBOARD_DIR
        self.writer = self._open(first_step)

    def _open(self, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.folder), purge_step=first_step or None)

    def rewind(self, first_step: int) -> None:
        self.writer.close()
        self.writer = self._open(first_step)  # its events of the steps logged again are dropped

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed job's charts reach its last step

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per job run (resumed as the same run), every row against its `step` column."""

    def __init__(self, cfg: JobConfig, run_dir: Path):
        import wandb

        w = cfg.metrics.wandb
        assert w is not None  # built only when the section is set
        id_file = run_dir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name or cfg.name,
            tags=list(w.tags),
            mode=w.mode,
            id=run_id,
            resume="allow",
            dir=str(run_dir),  # W&B writes under <dir>/wandb (WANDB_DIR)
            config=_without_secrets(cfg.model_dump(mode="json")),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        id_file.write_text(run_id + "\n")

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log({**_numbers(row), "step": step})

    def rewind(self, first_step: int) -> None:
        pass  # W&B keeps what it was sent: the steps logged again chart beside the abandoned ones

    def close(self) -> None:
        self.run.finish()


def _without_secrets(config: Any) -> Any:
    """The job's config for W&B, every `token` (the agent gateway's bearer token) masked: a run's
    config is visible to everyone its project is shared with."""
    if isinstance(config, dict):
        return {k: ("***" if k == "token" and v else _without_secrets(v)) for k, v in config.items()}
    if isinstance(config, list):
        return [_without_secrets(v) for v in config]
    return config


def open_trackers(cfg: JobConfig, run_dir: Path, first_step: int) -> list[Tracker]:
    """The trackers `cfg.metrics` turns on, for a run whose first logged step is `first_step`."""
    out: list[Tracker] = []
    if cfg.metrics.tensorboard:
        out.append(TensorBoardTracker(run_dir, first_step))
    if cfg.metrics.wandb is not None:
        out.append(WandbTracker(cfg, run_dir))
    return out
