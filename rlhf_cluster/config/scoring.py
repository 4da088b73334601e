"""The scoring pool and the reward sources (verifier | function | model | judge), with the old
spellings of the reward settings refused or translated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, TypeAlias

from pydantic import Field, field_validator, model_validator

from rlhf_cluster.config.base import FailureBudget, ResourcesConfig, _Strict, _Typed, typed_union


class RewardModelSpec(_Strict):
    """A frozen reward model served by the reward workers."""

    path: str = Field(..., description="Folder written by `rlhf-cluster train-rm` (backbone, head, tokenizer).")
    name: str = Field("rm", description="Name in reward_components (`rm/<name>`).")


def _check_function_spec(spec: str, field: str) -> str:
    # Only the shape here: importing user code belongs to the reward loader (scoring/rewards.py),
    # which preflight calls.
    module, sep, attr = spec.strip().partition(":")
    if not sep or not all(part.isidentifier() for part in f"{module}.{attr}".split(".")):
        raise ValueError(
            f"{field}={spec!r} must look like 'module:function' (an importable dotted module path, a colon, "
            "then the function name), e.g. 'my_rewards:score'"
        )
    return spec


# A reward source's weight, the same for each source kind that has one.
RewardWeight: TypeAlias = Annotated[
    float, Field(ge=0, description="Weight in the reward (0: only recorded in reward_components).")
]


class VerifierReward(_Typed):
    """The built-in task's verifier (`data.task`): 1 for a correct answer, plus its components."""

    type: Literal["verifier"] = Field("verifier", description="Reward source kind.")
    weight: RewardWeight = 1.0


class FunctionReward(_Typed, FailureBudget):
    """A user's reward function `module:function(response, answer, *, prompt, source, extra, prompt_id)
    -> float | dict[str, float]` (the keywords it names, any of them, or none), in place of the task's
    verifier (see rlhf_cluster/scoring/rewards.py for the contract); with `batch: true`, a TRL-style
    `function(completions=[...], prompts=[...], ..., **columns) -> list` over a whole batch
    (rlhf_cluster/scoring/batch_rewards.py)."""

    type: Literal["function"] = Field("function", description="Reward source kind.")
    function: str = Field(..., description="`module:function`, importable on every reward worker.")
    weight: RewardWeight = 1.0
    on_error: Literal["fail", "drop"] = Field(
        "drop",
        description="A call that raises, returns NaN/inf or a wrong type, or runs past timeout_s: `fail` ends "
        "the job naming the function, prompt and cause; `drop` drops the sample (counted, never trained on); its group "
        "keeps the rest when enough remain for the advantage estimator (2 for grpo, dr_grpo, rloo), else is dropped "
        "whole.",
    )
    timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds one call may take before it counts as failed (it is abandoned); with batch, the one "
        "call over the batch.",
    )
    concurrency: int = Field(
        1,
        ge=1,
        le=256,
        description="Calls one reward worker runs at once, each on its own thread (an `async def` function on its "
        "own event loop there), for slow verifiers: a sandbox, a remote API (slime's async reward functions, verl's "
        "parallel reward managers). Results keep the responses' order; timeout_s bounds each call.",
    )

    batch: bool = Field(
        False,
        description="Call the function once per scoring call (one or more groups) with lists, by keyword: "
        "completions, prompts, completion_ids, answer, source, prompt_id (TRL's names), solution_strs, ground_truths, "
        "data_sources, extra_infos (verl BatchRewardManager's) and each data.columns.extra column under its own name; "
        "it returns one reward (a number, a dict of components, or None: that sample failed) per response. TRL's "
        "reward functions (`reward_funcs`) run unchanged where they read text (completions are strings, None a "
        "failure, no trainer_state); verl's batched compute_score does, its dicts' `score` the reward. "
        "timeout_s bounds the one call; a call that raises, times out or returns a wrong length fails every sample "
        "of it (on_error judges each).",
    )

    @field_validator("function")
    @classmethod
    def _syntax(cls, spec: str) -> str:
        return _check_function_spec(spec, "function")

    @model_validator(mode="after")
    def _one_batch_call(self) -> FunctionReward:
        if self.batch and self.concurrency > 1:
            raise ValueError(
                f"scoring.rewards function {self.function!r}: batch: true calls the function once per batch, so "
                f"concurrency: {self.concurrency} has nothing to overlap; set concurrency: 1 (or batch: false)"
            )
        return self


class ModelReward(_Typed):
    """Frozen reward models (folders written by `rlhf-cluster train-rm`), scored as one ensemble."""

    type: Literal["model"] = Field("model", description="Reward source kind.")
    models: list[RewardModelSpec] = Field(
        default_factory=list, description="The ensemble's models (empty: none yet; `rlhf-cluster pipeline` fills it)."
    )
    combine: Literal["mean", "min"] = Field("mean", description="How the ensemble's scores become one.")
    weight: float = Field(1.0, ge=0, description="Weight of the ensemble's score in the reward.")

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[RewardModelSpec]) -> list[RewardModelSpec]:
        names = [m.name for m in models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"every model needs its own name (reward_components rm/<name>); used twice: {', '.join(twice)}"
            )
        return models


class JudgeReward(_Typed, FailureBudget):
    """A judge model's verdict as the reward (LLM-as-judge; `rlhf_cluster/scoring/judge.py`): served
    greedily by the judge workers' vLLM engines, its prompt a template around the sample."""

    type: Literal["judge"] = Field("judge", description="Reward source kind.")
    model: str = Field(..., description="The judge's Hugging Face model folder (a causal LM and its tokenizer).")
    name: str = Field("judge", description="Name in reward_components (`judge/<name>`).")
    template: str = Field(
        "correctness",
        description="The judge's prompt: a built-in template's name (correctness, score, best_of_group) or text "
        "naming {prompt}, {answer} and {response} ({responses}, numbered, for a group judge). Rendered as the user "
        "turn of the judge's chat template where its tokenizer has one.",
    )
    verdict: Literal["score_0_10", "yes_no", "choice"] = Field(
        "yes_no",
        description="How the reply becomes the reward: score_0_10 (the last number 0-10, /10), yes_no (the first "
        "yes/correct/true = 1 or no/wrong/incorrect/false = 0), choice (group judging: the best response's number; "
        "it gets 1, the others 0).",
    )
    group: bool = Field(False, description="Judge a prompt's whole group in one prompt (needs verdict: choice).")
    max_tokens: int = Field(16, ge=1, description="Tokens the judge may reply with.")
    weight: RewardWeight = 1.0
    quantization: Literal["none", "int8"] = Field("none", description="The judge engine's weights (int8: W8A8).")
    on_error: Literal["fail", "drop"] = Field(
        "drop",
        description="A reply no parser reads, or a failed judge call: `fail` ends the job naming the judge and "
        "the reply; `drop` drops the sample (counted, never trained on), as for a failing reward function.",
    )

    @model_validator(mode="after")
    def _verdict_fits_group(self) -> JudgeReward:
        # The template's placeholders are checked by preflight (rlhf_cluster/job/judge.py).
        if (self.verdict == "choice") != self.group:
            raise ValueError(
                f"scoring.rewards judge {self.name!r}: verdict `choice` picks among a group's responses and needs "
                "group: true; a group judge needs verdict: choice"
            )
        return self


# A sample's reward = weight x (verifier or function) + weight x ensemble(models) + weight x judge.
if TYPE_CHECKING:  # the union alone: mypy cannot read the Annotated union typed_union builds at run time
    RewardSource: TypeAlias = VerifierReward | FunctionReward | ModelReward | JudgeReward
else:
    RewardSource = typed_union(VerifierReward, FunctionReward, ModelReward, JudgeReward)


def _default_rewards() -> list[RewardSource]:
    return [VerifierReward()]  # the task's verifier (a lambda here would be typed list[VerifierReward])


class ScoringConfig(_Strict):
    """The scoring pools: reward workers (the reward sources), frozen reference workers (or, with
    `algorithm.distillation`, teacher workers in their place) and judge workers."""

    reward_replicas: int = Field(1, ge=1, description="RewardWorker actors.")
    reference_replicas: int = Field(
        1, ge=1, description="ReferenceWorker actors (TeacherWorker actors with `algorithm.distillation`)."
    )
    judge_replicas: int = Field(1, ge=1, description="JudgeWorker actors (with a `judge` source).")
    spares: int = Field(
        0,
        ge=0,
        description="Warm spares of each scoring pool the job runs (reward, reference or teacher, judge): "
        "workers started with their model loaded, out of rotation; a lost worker is replaced by one at once.",
    )
    reference: bool = Field(True, description="Compute reference log-probs (needed for KL).")
    rewards: list[RewardSource] = Field(
        default_factory=_default_rewards,
        min_length=1,
        description="Reward sources, summed with their weights: at most one rule source (`verifier`: the task's, or "
        "`function`: yours, in its place), at most one `model` ensemble and at most one `judge`.",
    )
    quantization: Literal["none", "int8"] = Field(
        "none", description="Frozen reward and reference models on int8 weights (per-channel W8A8) or not."
    )
    max_tokens_per_batch: int | Literal["auto"] = Field(
        "auto",
        description="Token budget of one frozen-model forward (padded tokens). `auto`: 8,192 on a CPU; on a GPU "
        "what fits in half the memory free once the models are loaded, 8,192 to 65,536 "
        "(rlhf_cluster/scoring/batching.py).",
    )

    @field_validator("max_tokens_per_batch")
    @classmethod
    def _budget(cls, value: int | str) -> int | str:
        if value != "auto" and int(value) < 16:
            raise ValueError(f"expected `auto` or a number of tokens >= 16, got {value}")
        return value

    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-worker resources.")

    @field_validator("rewards")
    @classmethod
    def _one_of_each(cls, sources: list) -> list:
        rules = [s.type for s in sources if not isinstance(s, ModelReward | JudgeReward)]
        if len(rules) > 1:
            raise ValueError(
                "at most one rule source (verifier or function: a function replaces the verifier), got "
                f"{', '.join(rules)}"
            )
        if sum(isinstance(s, ModelReward) for s in sources) > 1:
            raise ValueError("at most one `model` source: list every reward model in its `models`")
        if sum(isinstance(s, JudgeReward) for s in sources) > 1:
            raise ValueError("at most one `judge` source")
        return sources

    # ---- the typed sources, for the workers that serve them -------------------------------------
    @property
    def rule_source(self) -> VerifierReward | FunctionReward | None:
        return next((s for s in self.rewards if isinstance(s, VerifierReward | FunctionReward)), None)

    @property
    def judge_source(self) -> JudgeReward | None:
        return next((s for s in self.rewards if isinstance(s, JudgeReward)), None)

    @property
    def model_source(self) -> ModelReward | None:
        return next((s for s in self.rewards if isinstance(s, ModelReward)), None)

    def with_reward_models(self, models: list[RewardModelSpec]) -> ScoringConfig:
        """A copy whose `model` source serves `models`, keeping the source's weight and combine (or
        with a `model` source added: weight 1, mean), as `rlhf-cluster pipeline` builds its RL stage."""
        source = (self.model_source or ModelReward()).model_copy(update={"models": list(models)})
        rewards = [s for s in self.rewards if not isinstance(s, ModelReward)] + [source]
        return self.model_copy(update={"rewards": rewards})


def _legacy_rewards(raw: dict) -> dict:
    """The old spellings `data.reward_fn` and `scoring.{reward_models, rule_weight, reward_model_weight,
    reward_model_combine}` as `scoring.rewards`; `raw` is a job's input mapping (a copy is returned)."""
    data, scoring = raw.get("data"), raw.get("scoring")
    fn = None
    if isinstance(data, dict) and "reward_fn" in data:
        fn = data["reward_fn"]
        raw = {**raw, "data": {k: v for k, v in data.items() if k != "reward_fn"}}
    old = {k: scoring[k] for k in _LEGACY_SCORING if k in scoring} if isinstance(scoring, dict) else {}
    if fn is None and not old:
        return raw
    if scoring is not None and not isinstance(scoring, dict):
        raise ValueError("data.reward_fn is the old spelling of a `function` source: add it to scoring.rewards")
    scoring = {k: v for k, v in (scoring or {}).items() if k not in _LEGACY_SCORING}
    if "rewards" in scoring:
        raise ValueError(
            "scoring.rewards cannot be combined with the old spellings data.reward_fn, scoring.reward_models, "
            "scoring.rule_weight, scoring.reward_model_weight, scoring.reward_model_combine: write every source in "
            "scoring.rewards"
        )
    if fn is not None:
        if not isinstance(fn, str):
            raise ValueError(f"data.reward_fn must be a string 'module:function', got {fn!r}")
        rule: dict = {"type": "function", "function": _check_function_spec(fn, "data.reward_fn")}
    else:
        rule = {"type": "verifier"}
    rule["weight"] = old.get("rule_weight", 1.0)
    sources = [rule]
    if old.keys() - {"rule_weight"}:
        sources.append(
            {
                "type": "model",
                "models": old.get("reward_models") or [],
                "weight": old.get("reward_model_weight", 1.0),
                "combine": old.get("reward_model_combine", "mean"),
            }
        )
    return {**raw, "scoring": {**scoring, "rewards": sources}}


_LEGACY_SCORING = ("reward_models", "rule_weight", "reward_model_weight", "reward_model_combine")
