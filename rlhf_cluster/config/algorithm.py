"""The RL algorithm: advantage estimator, policy loss, KL, importance correction, shaping, presets."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rlhf_cluster.algorithms.presets import PRESETS, merge_preset
from rlhf_cluster.config.base import _Strict
from rlhf_cluster.config.scoring import _check_function_spec

# Advantage estimators that compare a prompt's samples with each other: a group needs two or more.
GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # a baseline from the prompt's group
DISTILLED_ADVANTAGES = ("grpo", "dr_grpo", "rloo")  # the group's advantages final when scored


class LossConfig(_Strict):
    """The policy loss: PPO's clipped surrogate or CISPO's clipped weight (`mode`), or a user's own
    function (`function`)."""

    clip_low: float = Field(0.2, ge=0, description="PPO clip below 1 (verl clip_ratio_low, TRL epsilon).")
    clip_high: float = Field(
        0.2, ge=0, description="PPO clip above 1 (DAPO clip-higher: 0.28; verl clip_ratio_high, TRL epsilon_high)."
    )
    clip_ratio_c: float | None = Field(
        None,
        gt=1.0,
        description="Dual-clip PPO (Ye et al. 2020): for a negative advantage the per-token loss is capped "
        "at -A * clip_ratio_c, so a ratio far above 1 cannot push a bad token down without bound "
        "(e.g. 3.0; None: off).",
    )
    ratio_level: Literal["token", "sequence"] = Field("token", description="token = PPO/GRPO, sequence = GSPO.")
    aggregation: Literal["token_mean", "sequence_mean", "sequence_sum_norm"] = Field(
        "token_mean",
        description="How per-token losses become one number; denominators are global across ranks. verl "
        "loss_agg_mode token-mean / seq-mean-token-mean / seq-mean-token-sum-norm; TRL loss_type dapo / grpo / "
        "dr_grpo.",
    )
    mode: Literal["ppo", "cispo"] = Field(
        "ppo",
        description="ppo: the clipped surrogate (a token whose ratio left [1-clip_low, 1+clip_high] in its advantage's "
        "direction gives no gradient). cispo (MiniMax-M1; ScaleRL): the importance weight clamped to that band and "
        "detached, every token's gradient kept (verl policy_loss.loss_mode, SkyRL policy_loss_type, TRL loss_type "
        "cispo); preset `cispo` clamps to [0, 4] as Tinker's CISPO does.",
    )
    function: str | None = Field(
        None,
        description="A user's policy loss `module:function` in place of the built-in one (slime --loss-type "
        "custom_loss with --custom-loss-function-path; verl policy_loss.loss_mode naming a loss registered with "
        "register_policy_loss). Imported on every policy learner rank (not the critic's) and called per micro-batch "
        "as fn(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, aggregation, correction, "
        "denominator, max_tokens) -> (0-dim loss tensor, {name: 0-dim tensor}), as the built-in losses are "
        "(rlhf_cluster/algorithms/losses.py); aggregate with `aggregate_loss` to keep the global denominators. "
        "The TIS/MIS correction weights (algorithm.correction) are passed in as `correction` and the function "
        "must apply them, once (aggregate_loss(..., correction=correction) does): nothing applies them around it; "
        "the KL term and entropy bonus do apply around it. The loss must be built from logprobs on every call, an "
        "all-masked micro-batch included (aggregate_loss gives 0 with a gradient). Its metrics report as "
        "policy/<name> and must be fixed names, the same on every call and rank. Takes mode ppo, ratio_level "
        "token and no clip_ratio_c (None: the built-in loss).",
    )

    @field_validator("function")
    @classmethod
    def _function_syntax(cls, spec: str | None) -> str | None:
        return None if spec is None else _check_function_spec(spec, "algorithm.loss.function")

    @model_validator(mode="after")
    def _function_alone(self) -> LossConfig:
        # The user's function gets the settings every loss shares; these three choose among the built-in ones.
        if self.function is not None and (
            self.mode != "ppo" or self.ratio_level != "token" or self.clip_ratio_c is not None
        ):
            raise ValueError(
                f"algorithm.loss.function={self.function!r} replaces the built-in loss; algorithm.loss.mode, "
                "ratio_level and clip_ratio_c choose among the built-in ones and would be ignored: expected mode ppo, "
                f"ratio_level token, no clip_ratio_c (got mode {self.mode}, ratio_level {self.ratio_level}, "
                f"clip_ratio_c {self.clip_ratio_c}; presets gspo and cispo set them)"
            )
        return self

    @model_validator(mode="after")
    def _cispo_alone(self) -> LossConfig:
        # CISPO weights each token's own log-prob: no sequence ratio (GSPO) and no dual clip to apply.
        if self.mode == "cispo" and (self.ratio_level != "token" or self.clip_ratio_c is not None):
            raise ValueError(
                "algorithm.loss.mode: cispo clamps each token's weight; it takes ratio_level: token and no "
                f"clip_ratio_c (got ratio_level {self.ratio_level}, clip_ratio_c {self.clip_ratio_c})"
            )
        return self


class ReferenceRefreshConfig(_Strict):
    """The KL reference moved to the policy every `every_steps` steps (`rlhf_cluster/weights/reference_refresh.py`)."""

    every_steps: int = Field(
        ...,
        ge=1,
        description="Refresh the reference after every this many steps, from the policy's weight version of that "
        "step (TRL ref_model_sync_steps; ProRL's reference reset interval).",
    )
    mix: float = Field(
        1.0,
        gt=0,
        le=1,
        description="How far the reference moves: ref <- mix * policy + (1 - mix) * ref (TRL ref_model_mixup_alpha, "
        "default 0.6 there); 1 = replaced by the policy (ProRL's hard reset).",
    )
    reset_optimizer: bool = Field(
        False,
        description="Also clear the policy's optimizer state (AdamW's moments and step count) at each refresh, as "
        "ProRL resets it with the reference; the LR schedule goes on. FSDP2 learners only.",
    )


class KLConfig(_Strict):
    """KL to the reference policy."""

    placement: Literal["loss", "reward", "none"] = Field(
        "loss", description="KL in the loss (GRPO; verl use_kl_loss) or in the reward (PPO; verl use_kl_in_reward)."
    )
    estimator: Literal["k1", "k2", "k3"] = Field(
        "k3",
        description="KL estimator in the loss (in-reward KL always uses k1). verl kl_loss_type kl / mse / "
        "low_var_kl = k1 / k2 / k3, but verl clamps low_var_kl's value to [-10, 10]; here k3 is unclamped "
        "(k3_log_ratio_clamp bounds the log-ratio, a different quantity).",
    )
    k3_log_ratio_clamp: float | None = Field(
        None,
        gt=0,
        description="Clamp the k3 estimator's log-ratio log(pi_ref/pi) to [-c, c] in the loss: bounds the "
        "exp(log r) term (and its gradient) on tokens where the policy has moved far from the reference, at the price "
        "of "
        "a biased estimate there (e.g. 10; None: only the overflow guard at 20).",
    )
    coef: float = Field(
        0.01,
        ge=0,
        description="KL coefficient (beta) of whichever placement (verl's kl_loss_coef or kl_ctrl.kl_coef); the "
        "adaptive controller's initial value.",
    )
    controller: Literal["fixed", "adaptive"] = Field(
        "fixed", description="Fixed coefficient or a proportional controller."
    )
    target: float = Field(
        6.0,
        gt=0,
        description="Adaptive controller: the KL it steers towards, per SEQUENCE (summed over its tokens), not "
        "verl's per-token mean kl_ctrl.target_kl: a verl target of 0.1 is about 0.1 x mean response tokens here.",
    )
    horizon: int = Field(10000, ge=1, description="Adaptive controller: horizon in samples.")
    reference_refresh: ReferenceRefreshConfig | None = Field(
        None,
        description="Move the reference to the policy every N steps (TRL sync_ref_model, ProRL's reference reset); "
        "None: the reference stays the model the job started from. Each refresh writes a model folder under the run "
        "directory (reference/v<version>); samples scored before it keep the old reference's log-probs.",
    )


class CorrectionConfig(_Strict):
    """Importance correction for the rollout/learner mismatch (TIS/MIS)."""

    enabled: bool = Field(True, description="Multiply the policy loss by rollout importance weights.")
    level: Literal["token", "sequence", "geometric"] = Field("token", description="Granularity of the weight.")
    mode: Literal["truncate", "mask"] = Field("truncate", description="truncate = TIS, mask = MIS.")
    cap: float = Field(2.0, gt=0, description="Upper bound C.")
    lower: float | None = Field(
        None,
        ge=0,
        description="Lower bound: truncate raises a weight below it to it (slime --tis-clip-low, TRL clip_min), "
        "mask zeroes it (token level: ICEPOP); None: none.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> CorrectionConfig:
        if self.lower is not None and self.lower > self.cap:
            raise ValueError(
                f"algorithm.correction.lower={self.lower:g} is above cap={self.cap:g}: every weight would be one "
                "constant; expected lower <= cap"
            )
        return self


class ShapingConfig(_Strict):
    """Reward shaping and sample filters applied before the learner."""

    overlong_buffer: int = Field(
        0,
        ge=0,
        description="DAPO soft overlong punishment: tokens before max_new_tokens where it starts (0: use "
        "overlong_buffer_fraction if set, else off).",
    )
    overlong_buffer_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="The overlong buffer as a fraction of generation.sampling.max_new_tokens, rounded to whole "
        "tokens (DAPO: 4096 of 20480 = 0.2); used only when overlong_buffer is 0 (None: off).",
    )
    overlong_penalty: float = Field(1.0, ge=0, description="Penalty at max_new_tokens.")
    length_target: int | None = Field(None, ge=0, description="Length penalty -coef*max(0, len-target) (None: off).")
    length_coef: float = Field(0.001, ge=0, description="Length penalty coefficient.")
    overlong_filter: bool = Field(
        False,
        description="Drop truncated responses (finish_reason=length) from the loss (TRL mask_truncated_completions).",
    )
    dynamic_sampling: bool = Field(
        False,
        description="Drop groups whose rewards are all equal; generate more instead (verl filter_groups, DAPO).",
    )
    dynamic_sampling_metric: Literal["reward", "task_reward"] = Field(
        "reward",
        description="What dynamic_sampling compares within a group (verl filter_groups.metric). reward: the reward "
        "trained on, after the overlong and length penalties and a sequence KL in the reward (verl "
        "seq_final_reward); task_reward: the reward before them, as scored (with an environment's combined turn "
        "rewards) (verl acc / score; DAPO drops groups whose accuracy is all 0 or all 1, so a group of right "
        "answers that only the overlong penalty tells apart is dropped too). The dapo preset sets task_reward.",
    )
    group_filter: str | None = Field(
        None,
        description="dynamic_sampling's test as your own `module:function` (slime --dynamic-sampling-filter-path): "
        "called with a scored group's samples (a list of `ScoredSample`: reward, reward_components, response_ids, "
        "advantages ...) in the driver, it returns True to keep the group, False to drop it as dynamic sampling "
        "drops one (counted in dropped_zero_signal; another is generated in its place). Needs dynamic_sampling; "
        "replaces dynamic_sampling_metric's all-equal test.",
    )

    @field_validator("group_filter")
    @classmethod
    def _filter_syntax(cls, spec: str | None) -> str | None:
        return None if spec is None else _check_function_spec(spec, "algorithm.shaping.group_filter")

    @model_validator(mode="after")
    def _filter_needs_dynamic_sampling(self) -> ShapingConfig:
        if self.group_filter is not None and (not self.dynamic_sampling or self.dynamic_sampling_metric != "reward"):
            raise ValueError(
                "algorithm.shaping.group_filter is dynamic sampling's test: set dynamic_sampling true, and leave "
                f"dynamic_sampling_metric (got dynamic_sampling {self.dynamic_sampling}, dynamic_sampling_metric "
                f"{self.dynamic_sampling_metric!r}: the filter replaces the metric's all-equal test)"
            )
        return self

    def overlong_buffer_tokens(self, max_new_tokens: int) -> int:
        """The effective soft-punishment buffer in tokens: `overlong_buffer` when positive, else
        `overlong_buffer_fraction` x `max_new_tokens` rounded half up, else 0 (off)."""
        if self.overlong_buffer > 0:
            return self.overlong_buffer
        if self.overlong_buffer_fraction is None:
            return 0
        return math.floor(self.overlong_buffer_fraction * max_new_tokens + 0.5)


class DistillationConfig(_Strict):
    """On-policy distillation from a frozen teacher (rlhf_cluster/algorithms/distillation.py)."""

    teacher: str = Field(
        ...,
        description="The teacher: a Hugging Face model folder with the policy's tokenizer. The teacher pool serves "
        "it in the reference pool's place (scoring.reference, scoring.reference_replicas), so its per-token "
        "log-probs arrive where the reference's do.",
    )
    coef: float = Field(1.0, gt=0, description="Weight of each token's reverse-KL advantage.")
    mix_with_rewards: bool = Field(
        False,
        description="Add the task rewards' group advantage on every token (else the teacher is the only signal; "
        "rewards are still computed and reported).",
    )


class AlgorithmConfig(_Strict):
    """The RL algorithm: advantage estimator, loss, KL, correction and shaping.

    `preset` fills every field it names (rlhf_cluster/algorithms/presets.py); fields written
    next to it override the preset.
    """

    preset: Literal[tuple(PRESETS)] | None = Field(  # type: ignore[valid-type]
        None,
        description="One-line algorithm choice (a name of algorithms.presets.PRESETS); explicit fields override it.",
    )
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "reinforce_pp", "gae"] = Field(
        "grpo",
        description="Advantage estimator (a name of algorithms.advantages.ESTIMATORS). dr_grpo = grpo without the "
        "std division (verl norm_adv_by_std_in_grpo: false, TRL scale_rewards: none); TRL's loss_type dr_grpo is "
        "loss.aggregation sequence_sum_norm instead. reinforce_pp_baseline (verl, slime; OpenRLHF "
        "reinforce_baseline): the group's mean as baseline, then whitened over the step's batch.",
    )
    gamma: float = Field(1.0, gt=0, le=1, description="Discount of reinforce_pp returns and of gae.")
    lam: float = Field(
        0.95, ge=0, le=1, description="gae: the GAE lambda (1: Monte-Carlo returns minus values, 0: one-step TD)."
    )
    whiten_advantages: bool = Field(
        True,
        description="gae: whiten the advantages over the step's valid tokens (the critic's returns stay unwhitened).",
    )
    loss: LossConfig = Field(default_factory=LossConfig, description="Policy loss.")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL to the reference.")
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig, description="TIS/MIS.")
    shaping: ShapingConfig = Field(default_factory=ShapingConfig, description="Reward shaping and filters.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (verl entropy_coeff).")
    distillation: DistillationConfig | None = Field(
        None, description="On-policy distillation: each sampled token's advantage is its reverse KL to a teacher."
    )
    routing_replay: Literal["none", "rollout"] = Field(
        "none",
        description="Mixture-of-experts policies: rollout = the learner's MoE layers route each token to the experts "
        "the generation engine routed it to and recompute only the gate weights (R3); none = the learner routes "
        "itself. Refused for a dense model.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return merge_preset(PRESETS[data["preset"]], data)
        return data
