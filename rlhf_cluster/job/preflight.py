"""Preflight: every check of a whole job config, run before anything starts.

`load_config` (pydantic) checks each field and each section on its own. What relates sections to
each other is checked here, and whether the files a config names are usable (model folders, the
prompt file, the reward function, reward models, the DeepSpeed JSON) in `file_checks`, both from
`preflight`, in one place: the driver
runs `preflight` first thing (before any Ray call), `rlhf-cluster train --dry-run` runs it and
prints the outcome, `submit` runs the config rules before shipping a job.

Every refusal names the field and what was expected; all refusals of one config are reported
together in one `ConfigError`. Settings that are allowed but usually a mistake come back as
warnings. Ray-free; torch is imported only when a custom reward function has to be loaded.
"""

from __future__ import annotations

from collections.abc import Callable

from rlhf_cluster.config import ConfigError as ConfigError  # re-exported: what `preflight` raises
from rlhf_cluster.config import DeepSpeedBackend, FSDP2Backend, FunctionReward, JobConfig, ModelReward, VerifierReward
from rlhf_cluster.config.algorithm import GROUP_ADVANTAGES
from rlhf_cluster.job import agents, images, judge, routing_replay, teacher
from rlhf_cluster.job.epochs import with_epoch_steps
from rlhf_cluster.job.file_checks import FILE_CHECKS, resume_path_problems


def preflight(cfg: JobConfig, *, files: bool = True, resume: str | None = None) -> list[str]:
    """Check `cfg` as a whole; return its warnings, or raise `ConfigError` naming every problem.

    `files=False` skips the checks that read files or this machine (for a config checked on
    another machine than the one that runs it, as `submit` does). `resume`: a checkpoint path
    (`--resume PATH`) must verify.
    """
    problems = [p for rule in CONFIG_RULES for p in rule(cfg)]
    if files:
        problems += [p for check in FILE_CHECKS for p in check(cfg)]
        problems += resume_path_problems(resume)
    if problems:
        head = "config refused:" if len(problems) == 1 else f"config refused ({len(problems)} problems):"
        raise ConfigError(head + "".join(f"\n  {p}" for p in problems))
    return [w for rule in WARNING_RULES for w in rule(cfg)]


# ---- rules between sections -----------------------------------------------------------------
def _data_source(cfg: JobConfig) -> list[str]:
    if cfg.data.task is None and cfg.data.path is None:
        return ["data.task / data.path: both empty; set `task` (a built-in task) or `path` (a prompt file)"]
    return []


def _task_epochs(cfg: JobConfig) -> list[str]:
    # A built-in task's training prompts are its config's count: its epochs' steps are checked before the
    # run is opened (a user's file is counted at the job's start).
    if cfg.train.total_epochs is None or cfg.data.path is not None:
        return []
    try:
        with_epoch_steps(cfg, cfg.data.num_prompts, quiet=True)
    except ValueError as exc:
        return [str(exc)]
    return []


def _reward_sources(cfg: JobConfig) -> list[str]:
    # The reward workers always run a rule reward (the task's verifier records `correct` even at
    # weight 0), so without a task there must be a function.
    if cfg.data.verifier_name is not None or isinstance(cfg.scoring.rule_source, FunctionReward):
        return []
    where = next(
        (f"scoring.rewards[{i}]" for i, s in enumerate(cfg.scoring.rewards) if isinstance(s, VerifierReward)),
        "scoring.rewards",
    )
    return [
        f"{where}: no reward without a verifier: data.verifier and data.task are empty; set data.verifier (e.g. "
        "gsm8k) or add a `{type: function, function: 'module:function'}` source"
    ]


def _buffer_fits(cfg: JobConfig) -> list[str]:
    t = cfg.train
    need = ((t.max_staleness + 1) * t.prompts_per_step + t.oversample_groups) * cfg.generation.sampling.n
    if cfg.buffer.capacity < need:
        return [
            f"buffer.capacity={cfg.buffer.capacity} is smaller than ((train.max_staleness+1) * train.prompts_per_step "
            f"+ train.oversample_groups) * generation.sampling.n = {need}; expected at least {need}"
        ]
    return []


def _overlong_fits(cfg: JobConfig) -> list[str]:
    shaping, limit = cfg.algorithm.shaping, cfg.generation.sampling.max_new_tokens
    buffer = shaping.overlong_buffer_tokens(limit)
    if shaping.overlong_buffer > 0 or shaping.overlong_buffer_fraction is None:
        if buffer >= limit:
            return [
                f"algorithm.shaping.overlong_buffer={buffer} must be smaller than "
                f"generation.sampling.max_new_tokens={limit}"
            ]
        return []
    fraction = shaping.overlong_buffer_fraction
    if not 1 <= buffer < limit:
        return [
            f"algorithm.shaping.overlong_buffer_fraction={fraction} of generation.sampling.max_new_tokens={limit} "
            f"rounds to a buffer of {buffer} tokens; expected at least 1 and fewer than {limit}: set "
            "algorithm.shaping.overlong_buffer (tokens) instead, or overlong_buffer_fraction: null to turn it off"
        ]
    return []


def _lora(cfg: JobConfig) -> list[str]:
    if not cfg.learner.lora.enabled:
        return []
    out = []
    if not isinstance(cfg.learner.backend, FSDP2Backend):
        out.append(f"learner.lora needs learner.backend: fsdp2 (got {cfg.learner.backend.type})")
    if cfg.algorithm.kl.placement == "reward":
        out.append(
            "learner.lora with algorithm.kl.placement=reward: with LoRA the reference log-probs are computed by "
            "the learner at train time, after rewards are final; use kl.placement loss or none"
        )
    if cfg.learner.lora.sync == "adapters":
        if "int8" in cfg.generation.weight_variants:
            out.append(
                "learner.lora.sync: adapters with int8 rollouts (generation.quantization): the int8 engines cannot "
                "take adapters; set learner.lora.sync: merged"
            )
        if cfg.generation.speculative:
            out.append(
                "learner.lora.sync: adapters with generation.speculative: adapters are not served beside a "
                "draft model in this project (untested); set learner.lora.sync: merged"
            )
    return out


def _advantage_needs(cfg: JobConfig) -> list[str]:
    a = cfg.algorithm.advantage
    if a in GROUP_ADVANTAGES and cfg.generation.sampling.n < 2:
        return [
            f"algorithm.advantage={a} needs generation.sampling.n >= 2 (a group per prompt), got "
            f"{cfg.generation.sampling.n}"
        ]
    if a == "gae" and cfg.critic is None:
        return [
            "algorithm.advantage=gae needs a learned critic: add a `critic` section (e.g. `critic: {init: policy}`), "
            "or choose an advantage without one (grpo, dr_grpo, rloo, reinforce_pp)"
        ]
    return []


def batch_splits(cfg: JobConfig) -> list[str]:
    """Problems with how the step batch splits over the learner's (and critic's) ranks."""
    # Each step's samples are dealt round-robin to the ranks; an uneven split gives ranks
    # different batch sizes (and the global loss denominators assume equal shares).
    batch = cfg.samples_per_step
    groups = [("learner.world_size", cfg.learner.world_size)]
    if cfg.critic is not None:
        groups.append(("critic.world_size", cfg.critic.world_size))
    out = [
        f"the step batch train.prompts_per_step * generation.sampling.n = {cfg.train.prompts_per_step} * "
        f"{cfg.generation.sampling.n} = {batch} is not divisible by {field}={world}; change one of them so every "
        "rank gets the same number of samples"
        for field, world in groups
        if batch % world
    ]
    per_rank = batch // cfg.learner.world_size
    if not out and per_rank < cfg.learner.mini_batches:
        out.append(
            f"learner.mini_batches={cfg.learner.mini_batches} is larger than the samples each rank gets per step "
            f"(train.prompts_per_step * generation.sampling.n / learner.world_size = {per_rank}); "
            "a mini-batch would be empty"
        )
    return out


def _elastic_backend(cfg: JobConfig) -> list[str]:
    if cfg.faults.elastic and isinstance(cfg.learner.backend, DeepSpeedBackend):
        return [
            "faults.elastic needs learner.backend=fsdp2: DeepSpeed ZeRO checkpoints resume only at the world size "
            "that wrote them, so a learner cannot continue on fewer ranks"
        ]
    return []


def _tool_task_episodes(cfg: JobConfig) -> list[str]:
    # Its warm-up teaches calculator calls, and its verifier reads the answer after the tool's result.
    if cfg.data.task != "tool_arithmetic" or cfg.generation.environment is not None or cfg.generation.agent is not None:
        return []
    return [
        "generation.environment is empty, but data.task=tool_arithmetic is answered in episodes with a "
        "calculator: set generation.environment: tools (configs/tool_demo.yaml)"
    ]


def _guardrails(cfg: JobConfig) -> list[str]:
    from rlhf_cluster.job.guardrails import metric_problem

    g = cfg.guardrails
    if not g.active:
        return []
    if not cfg.data.eval_every_steps:
        return [
            "guardrails: keep_best / patience / target / rollback.eval_drop act on the periodic evaluation, which is "
            "off; set "
            "data.eval_every_steps (and held-out prompts: data.eval_prompts, or data.eval_fraction / eval_path)"
        ]
    problem = metric_problem(g.metric, cfg.data)
    return [problem] if problem else []


def _reference_refresh(cfg: JobConfig) -> list[str]:
    kl = cfg.algorithm.kl
    if kl.reference_refresh is None:
        return []
    if cfg.learner.lora.enabled:
        return [
            "algorithm.kl.reference_refresh with learner.lora: with LoRA the reference is the learner's base model "
            "(adapters off), which a refresh cannot move; train without LoRA or without reference_refresh"
        ]
    if kl.reference_refresh.reset_optimizer and not isinstance(cfg.learner.backend, FSDP2Backend):
        return [
            "algorithm.kl.reference_refresh.reset_optimizer with learner.backend deepspeed: only FSDP2 learners "
            "clear their optimizer state; use learner.backend fsdp2 or leave reset_optimizer false"
        ]
    if cfg.algorithm.distillation is not None or kl.placement == "none" or (kl.coef == 0 and kl.controller == "fixed"):
        return [
            "algorithm.kl.reference_refresh: no KL term reads the reference (kl.placement none, kl.coef 0 or "
            "distillation's teacher in its place), so a refresh would change nothing; remove it"
        ]
    return []


CONFIG_RULES: list[Callable[[JobConfig], list[str]]] = [
    _data_source,
    _task_epochs,
    _reward_sources,
    _buffer_fits,
    _overlong_fits,
    _lora,
    _advantage_needs,
    batch_splits,
    _elastic_backend,
    _tool_task_episodes,
    agents.rules,
    _guardrails,
    teacher.rules,
    _reference_refresh,
    judge.rules,
    routing_replay.rules,
    images.rules,
]


# ---- allowed, but usually a mistake ---------------------------------------------------------
def _unused_critic(cfg: JobConfig) -> list[str]:
    if cfg.critic is not None and cfg.algorithm.advantage != "gae":
        return [
            f"a critic section is set but algorithm.advantage={cfg.algorithm.advantage}: only gae uses the critic, "
            "so no critic is started"
        ]
    return []


def _int8_without_correction(cfg: JobConfig) -> list[str]:
    if "int8" in cfg.generation.weight_variants and not cfg.algorithm.correction.enabled:
        return [
            "generation.quantization=int8 with algorithm.correction.enabled=false: samples from int8 weights "
            "are trained on without importance correction, so the gradient carries the quantization mismatch"
        ]
    return []


def _oversampling_always_stale(cfg: JobConfig) -> list[str]:
    if cfg.train.oversample_groups and cfg.train.max_staleness == 0:
        return [
            "train.oversample_groups > 0 with train.max_staleness = 0: a late group is always one version old "
            "by the next step, so every over-sampled group is generated and then dropped as stale"
        ]
    return []


def _in_flight_update_unused(cfg: JobConfig) -> list[str]:
    if cfg.generation.mode == "batched" and cfg.generation.in_flight_update != "resume":
        return ["generation.in_flight_update applies to mode streaming only; batched loads weights between requests"]
    return []


def _empty_ensemble(cfg: JobConfig) -> list[str]:
    return [
        f"scoring.rewards[{i}] (type: model) lists no models, so it adds nothing to the reward "
        "(`rlhf-cluster pipeline` fills it with the reward model it trains)"
        for i, s in enumerate(cfg.scoring.rewards)
        if isinstance(s, ModelReward) and not s.models
    ]


def _task_verifier_on_a_users_file(cfg: JobConfig) -> list[str]:
    if (
        cfg.data.path
        and cfg.data.verifier is None
        and cfg.data.task
        and not isinstance(cfg.scoring.rule_source, FunctionReward)
    ):
        return [
            f"data.path is a file of your own but data.verifier is not set: the built-in task's {cfg.data.task!r} "
            "verifier scores its responses; set data.verifier (gsm8k, boxed, exact, regex) or a function reward"
        ]
    return []


def _steps_and_epochs(cfg: JobConfig) -> list[str]:
    t = cfg.train
    replaced = t.total_epochs is not None and "total_steps" in t.model_fields_set
    why = f"train.total_steps={t.total_steps} is replaced by the steps of train.total_epochs={t.total_epochs}"
    return [f"{why} (counted from the training prompts at the job's start); set one of them"] if replaced else []


def _no_held_out_prompts(cfg: JobConfig) -> list[str]:
    d = cfg.data
    if d.path is None or d.eval_path is not None or d.eval_fraction or not d.eval_prompts:
        return []
    periodic = f" (nor every data.eval_every_steps={d.eval_every_steps})" if d.eval_every_steps else ""
    return [
        f"data.path has no held-out prompts: the job evaluates none before and after training{periodic}, and "
        f"data.eval_prompts={d.eval_prompts} has none to choose from; set data.eval_fraction (e.g. 0.05) or "
        "data.eval_path, or data.eval_prompts: 0 to say no evaluation is wanted"
    ]


def _filter_metric_unused(cfg: JobConfig) -> list[str]:
    shaping = cfg.algorithm.shaping
    if shaping.dynamic_sampling_metric != "reward" and not shaping.dynamic_sampling:
        return [
            f"algorithm.shaping.dynamic_sampling_metric={shaping.dynamic_sampling_metric} with dynamic_sampling "
            "false: no group is dropped, so the metric is unused (set dynamic_sampling true)"
        ]
    return []


def _accuracy_of_a_function(cfg: JobConfig) -> list[str]:
    g, rule = cfg.guardrails, cfg.scoring.rule_source
    if not g.active or "reward_mean" in g.metric or not isinstance(rule, FunctionReward):
        return []
    return [
        f"guardrails.metric={g.metric} with the reward function {rule.function}: if it returns a number (not a dict "
        "with `correct`, or verl's `acc`, 0 or 1), no held-out accuracy is measured and these guardrails do nothing; "
        "then watch eval_reward_mean, or return {'reward': r, 'correct': c}"
    ]


def _refresh_never_due(cfg: JobConfig) -> list[str]:
    every = cfg.reference_refresh_every
    if every and every >= cfg.train.total_steps and cfg.train.total_epochs is None:
        return [
            f"algorithm.kl.reference_refresh.every_steps={every} with train.total_steps={cfg.train.total_steps}: "
            "the job ends before its first refresh"
        ]
    return []


WARNING_RULES: list[Callable[[JobConfig], list[str]]] = [
    _refresh_never_due,
    _unused_critic,
    _filter_metric_unused,
    _int8_without_correction,
    _oversampling_always_stale,
    _in_flight_update_unused,
    _empty_ensemble,
    _task_verifier_on_a_users_file,
    _no_held_out_prompts,
    _steps_and_epochs,
    _accuracy_of_a_function,
]
