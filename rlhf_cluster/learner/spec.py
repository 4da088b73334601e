"""What a learner rank is built from (`LearnerSpec`) and what one learner step's passes did
(`Passes`): the plain records around `LearnerBase`, apart from its step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf_cluster.config import AlgorithmConfig, JobConfig, LearnerConfig
from rlhf_cluster.learner.images import LearnerImages
from rlhf_cluster.learner.micro_batches import Rows
from rlhf_cluster.learner.schedule import lr_multiplier


@dataclass(frozen=True)
class LearnerSpec:
    """What one learner rank is built from: its own section, the algorithm it optimises, and the
    two values of how rollouts are sampled that its maths needs, named (log-probs are recomputed
    at the engines' temperature; `seq_mean_token_sum_norm` divides by max_new_tokens), and the
    image sizes a vision-language policy's processor resizes to (`data.min_pixels` / `max_pixels`,
    as the engines do; None: the model folder's)."""

    learner: LearnerConfig
    algorithm: AlgorithmConfig
    temperature: float
    max_new_tokens: int
    min_pixels: int | None = None
    max_pixels: int | None = None
    # The longest row the job can make (`generation.max_model_len`), what the memory plan counts as a
    # micro-batch's fewest tokens (a longer row than the budget goes alone); None: not known.
    longest_row: int | None = None
    total_steps: int | None = None  # the job's learner steps (`train.total_steps`), where the LR schedule ends

    def lr_factor(self, step: int) -> float:
        """The factor on `learner.lr` for learner step `step` (`learner.lr_schedule` after its warm-up)."""
        lc = self.learner
        return lr_multiplier(step, lc.lr_warmup_steps, self.total_steps, lc.lr_schedule, lc.min_lr_ratio)

    @classmethod
    def of_policy(cls, cfg: JobConfig) -> LearnerSpec:
        """The policy learner's spec from the job's sections (`learner`, `algorithm`,
        `generation.sampling`, the images' sizes of `data`)."""
        sampling, data = cfg.generation.sampling, cfg.data
        return cls(
            cfg.learner,
            cfg.algorithm,
            sampling.temperature,
            sampling.max_new_tokens,
            data.min_pixels,
            data.max_pixels,
            cfg.generation.max_model_len,
            cfg.train.total_steps,
        )

    def images_of(self, model_path: str) -> LearnerImages | None:
        """The image side of the policy in `model_path` (None: a text-only model)."""
        return LearnerImages.of_folder(model_path, self.min_pixels, self.max_pixels)


@dataclass
class Passes:
    """What `LearnerBase._optimize` did in one learner step."""

    losses: list[list[float]] = field(
        default_factory=list
    )  # [epoch][mini-batch]: this rank's summed micro-batch losses
    micro_metrics: list[tuple[Rows, dict]] = field(default_factory=list)  # every real micro-batch's rows and metrics
    grad_norm: float = 0.0  # pre-clip global gradient norm of the last update
    skipped: int = 0  # updates skipped for a non-finite loss or gradient
    step_values: list[float] = field(default_factory=list)  # `read_at_last_update`'s values, read with the last update
    loss_tensors: list[torch.Tensor] = field(default_factory=list)  # every update's summed loss, on the device
