"""Preflight's checks of the files a config names and of this machine: model folders, the prompt
file, reward functions and models, a policy loss function, a group filter, episode code (environments, agents),
the critic's start, the DeepSpeed JSON, bind addresses, vLLM engine arguments, a resume
checkpoint. `preflight` runs them unless the config is checked on another machine than the one
that runs it (`files=False`). Ray-free; torch is imported only when a custom reward function,
policy loss or agent has to be loaded."""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from rlhf_cluster.config import DeepSpeedBackend, FunctionReward, JobConfig, ModelReward
from rlhf_cluster.job import agents, images, judge, routing_replay, teacher


def _model_dir(cfg: JobConfig) -> list[str]:
    from rlhf_cluster.job.validation import validate_model_dir

    problems = []
    if cfg.model.path is not None:
        try:
            validate_model_dir(cfg.model.path, needs_chat_template=cfg.data.chat_template)
        except (OSError, ValueError) as exc:
            problems.append(
                f"model.path: {exc}" + (" (data.chat_template is on)" if "chat template" in str(exc) else "")
            )
    if cfg.model.path is not None and not problems and cfg.generation.resources.num_gpus == 0:
        from rlhf_cluster.models.moe import cpu_engine_refusal

        if (why := cpu_engine_refusal(cfg.model.path, "int8" in cfg.generation.weight_variants)) is not None:
            gpus = "generation.resources.num_gpus=0"
            problems.append(f"model.path: a mixture of experts vLLM's CPU engine cannot serve ({why}; {gpus})")
    draft = cfg.generation.speculative.model if cfg.generation.speculative else None
    if draft is not None:
        try:
            validate_model_dir(draft)
        except (OSError, ValueError) as exc:
            problems.append(f"generation.speculative.model: {exc}")
    return problems


def _context_fits(cfg: JobConfig) -> list[str]:
    """`generation.max_model_len` within the policy's positions: vLLM refuses a longer one, but only
    once an engine starts (minutes into a real job). A model whose config scales its positions
    (a `rope_scaling` factor) is left to vLLM, which counts the scaling; so is a job run with vLLM's
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."""
    import json
    import os
    from pathlib import Path

    from rlhf_cluster.config.inputs import folder_max_length

    if os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") == "1":
        return []
    limit: int | None
    if cfg.model.path is None:
        limit, where = cfg.model.tiny.max_position_embeddings, "model.tiny.max_position_embeddings"
    else:
        folder = Path(cfg.model.path).expanduser()
        try:
            config = json.loads((folder / "config.json").read_text())
            limit, where = folder_max_length(folder), f"{folder / 'config.json'}: max_position_embeddings"
        except (OSError, ValueError):
            return []  # no readable config: `_model_dir` says why
        if _scales_positions(config):
            return []
    wanted = cfg.generation.max_model_len
    if limit is None or wanted <= limit:
        return []
    return [
        f"generation.max_model_len={wanted} is longer than the model's {limit} positions ({where}), which vLLM "
        f"refuses when an engine starts; expected at most {limit}"
    ]


def _scales_positions(config: dict) -> bool:
    """Whether a model config scales its rotary positions by a factor: `rope_scaling`, or
    transformers 5's `rope_parameters` (per attention kind, one level down, too), at its top or in
    its `text_config`."""
    for section in (config, config.get("text_config") or {}):
        for key in ("rope_scaling", "rope_parameters"):
            value = section.get(key)
            kinds = [value, *value.values()] if isinstance(value, dict) else []
            if any(isinstance(kind, dict) and kind.get("factor") for kind in kinds):
                return True
    return False


def _tracker_packages(cfg: JobConfig) -> list[str]:
    """The trackers turned on (`metrics.tensorboard`, `metrics.wandb`) have their package here, and
    an online W&B run a key (or the first step would fail after minutes of start-up)."""
    wanted = {"metrics.tensorboard": ("tensorboard", cfg.metrics.tensorboard)}
    wanted["metrics.wandb"] = ("wandb", cfg.metrics.wandb is not None)
    out = [
        f"{field}: needs the `{package}` package (pip install -e '.[tracking]', or pip install {package})"
        for field, (package, on) in wanted.items()
        if on and not _installed(package)
    ]
    if cfg.metrics.wandb is not None and cfg.metrics.wandb.mode == "online" and not _wandb_key():
        out.append(
            "metrics.wandb: no W&B API key here (WANDB_API_KEY, or `wandb login`); or set metrics.wandb.mode: "
            "offline and `wandb sync` the run later"
        )
    return out


def _wandb_key() -> bool:
    """Whether W&B finds a key: WANDB_API_KEY, a mode that needs none, or `wandb login`'s netrc entry."""
    import netrc
    import os
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _prompt_file(cfg: JobConfig) -> list[str]:
    # Every file, the whole of each: every row is checked before any work starts.
    from rlhf_cluster.data.eval_split import split_by_file, split_by_fraction
    from rlhf_cluster.data.prompt_files import as_paths, describe, read_prompts
    from rlhf_cluster.job.images import image_limits

    if cfg.data.path is None:
        return []
    try:
        prompts = read_prompts(cfg.data.path, cfg.data.columns, **image_limits(cfg))
    except (OSError, ValueError) as exc:  # several files' errors name their place (data.path[1]: ...)
        return [str(exc) if str(exc).startswith("data.path") else f"data.path: {exc}"]
    try:
        if cfg.data.eval_path is not None:
            held_out = read_prompts(cfg.data.eval_path, cfg.data.columns, field="data.eval_path", **image_limits(cfg))
            split_by_file(prompts, held_out, describe(as_paths(cfg.data.eval_path)))
        elif cfg.data.eval_fraction:
            assert cfg.data.seed is not None  # JobConfig resolves every component seed when it validates
            split_by_fraction(prompts, cfg.data.eval_fraction, cfg.data.seed)
    except (OSError, ValueError) as exc:
        return [str(exc) if str(exc).startswith("data.") else f"data.eval_path: {exc}"]
    return []


def _reward_files(cfg: JobConfig) -> list[str]:
    from rlhf_cluster.job.validation import validate_reward_model_dir

    out = []
    for i, source in enumerate(cfg.scoring.rewards):
        if isinstance(source, FunctionReward):
            from rlhf_cluster.scoring.rewards import load_reward_fn  # imports torch: only when there is one

            try:
                field = f"scoring.rewards[{i}].function"
                load_reward_fn(source.function, field, batch=source.batch, columns=cfg.data.columns.extra)
            except ValueError as exc:
                out.append(str(exc))
        elif isinstance(source, ModelReward):
            for j, spec in enumerate(source.models):
                try:
                    validate_reward_model_dir(spec.path, field=f"scoring.rewards[{i}].models[{j}].path")
                except (OSError, ValueError) as exc:
                    out.append(str(exc))
    return out


def _user_functions(cfg: JobConfig) -> list[str]:
    # A policy loss and dynamic sampling's filter, loaded by the loaders the learner ranks and the driver
    # use (`RLObjective`, `experience.group_filter`): a missing module, a name that is no function or a
    # signature the learner cannot call is refused here, before Ray starts.
    named: list[tuple[str, Callable[[str], object]]] = []
    if cfg.algorithm.loss.function is not None:
        from rlhf_cluster.learner.objective import load_policy_loss  # imports torch: only when there is one

        named.append((cfg.algorithm.loss.function, load_policy_loss))
    if cfg.algorithm.shaping.group_filter is not None:
        from rlhf_cluster.experience.group_filter import load_group_filter

        named.append((cfg.algorithm.shaping.group_filter, load_group_filter))
    out = []
    for spec, load in named:
        try:
            load(spec)
        except ValueError as exc:
            out.append(str(exc))
    return out


def _episode_code(cfg: JobConfig) -> list[str]:
    # Loaded by the loaders the workers use (`load_environment` in each generation worker, `load_agent`
    # in each gateway), so the dry run and the driver refuse what the workers would, before Ray starts.
    gen = cfg.generation
    if gen.environment is not None:
        from rlhf_cluster.generation.environments import BUILT_IN, load_environment

        try:
            load_environment(gen.environment)
        except ValueError as exc:
            known = ", ".join(BUILT_IN)
            close = difflib.get_close_matches(gen.environment, BUILT_IN, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; or a built-in one: {known}"
            return [f"{exc}{hint}" if ":" not in gen.environment else str(exc)]
    if gen.agent is not None and gen.agent.function is not None:
        from rlhf_cluster.gateway.runner import load_agent  # imports torch: only for an agent job

        try:
            load_agent(gen.agent.function)
        except ValueError as exc:
            return [str(exc)]
    return []


def _critic_init(cfg: JobConfig) -> list[str]:
    from rlhf_cluster.job.validation import validate_reward_model_dir

    if cfg.critic is None or cfg.algorithm.advantage != "gae" or cfg.critic.init == "policy":
        return []
    try:
        validate_reward_model_dir(cfg.critic.init, field="critic.init")
    except (OSError, ValueError) as exc:
        return [str(exc)]
    return []


def _deepspeed_json(cfg: JobConfig) -> list[str]:
    from rlhf_cluster.learner.deepspeed_config import DeepSpeedJSONError, check_user_json, read_user_json

    backend = cfg.learner.backend
    if not isinstance(backend, DeepSpeedBackend) or not backend.config_file:
        return []
    try:
        check_user_json(read_user_json(backend.config_file), backend.config_file, cfg.learner, cfg.learner.world_size)
    except DeepSpeedJSONError as exc:
        return [str(exc)]
    return []


def _bind_address(cfg: JobConfig) -> list[str]:
    if not cfg.metrics.enabled:
        return []
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in cfg.metrics.bind_address else socket.AF_INET) as sock:
            sock.bind((cfg.metrics.bind_address, 0))
    except OSError as exc:
        return [
            f"metrics.bind_address={cfg.metrics.bind_address!r}: cannot listen there on this machine ({exc.strerror}); "
            "use an address of this host, e.g. 127.0.0.1 or 0.0.0.0"
        ]
    return []


def _engine_kwargs(cfg: JobConfig) -> list[str]:
    # Checked against the installed vLLM's own EngineArgs (imported only when there are any).
    if not cfg.generation.engine_kwargs:
        return []
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    hints = [
        f"{k}" + (f" (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, known, 1)) else "")
        for k in sorted(set(cfg.generation.engine_kwargs) - known)
    ]
    return [f"generation.engine_kwargs: not a vllm EngineArgs field: {', '.join(hints)}"] if hints else []


FILE_CHECKS: list[Callable[[JobConfig], list[str]]] = [
    _model_dir,
    _context_fits,
    _tracker_packages,
    _prompt_file,
    _reward_files,
    _user_functions,
    _episode_code,
    _critic_init,
    _deepspeed_json,
    _bind_address,
    _engine_kwargs,
    agents.file_problems,
    teacher.folder_problems,
    judge.folder_problems,
    routing_replay.file_checks,
    images.file_checks,
]


def _installed(package: str) -> bool:
    """Whether `package` imports as a package or module: a folder of that name in the working directory
    (a run directory's `wandb/`) is a namespace package, no install."""
    spec = importlib.util.find_spec(package)
    return spec is not None and spec.origin is not None


def resume_path_problems(resume: str | None) -> list[str]:
    if resume is None or resume == "auto":
        return []  # auto: the newest checkpoint that verifies, or a fresh start when there is none
    from rlhf_cluster.run.checkpoint import CheckpointError, CheckpointStore

    if not Path(resume).expanduser().is_dir():  # `latest`, a mistyped path: say what the option takes
        return [
            f"--resume {resume}: no such checkpoint folder; --resume takes `auto` (the run's newest checkpoint that "
            "verifies) or a checkpoint folder (<run_dir>/checkpoints/step-NNNNNNNN)"
        ]
    try:
        CheckpointStore.verify(resume)
    except CheckpointError as exc:
        return [f"--resume {resume}: {exc}"]
    return []
