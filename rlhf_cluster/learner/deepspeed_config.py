"""The DeepSpeed config of the learner: our settings merged with the user's own JSON, checked.

The learner drives the parts DeepSpeed would otherwise own: gradient accumulation (micro-batches
cut by `learner.max_tokens_per_micro_batch`, with global loss denominators), the learning rate
(`learner.lr` with `learner.lr_warmup_steps` and `lr_schedule`), clipping (`learner.max_grad_norm`) and precision
(`learner.mixed_precision`). A user JSON that sets any of these differently would be silently
overridden or, worse, applied twice, so it is an error that names the file, the field and what
was expected. Everything else in the JSON (ZeRO bucket sizes, prefetching, communication
settings, ...) is passed through to DeepSpeed as written.

This module imports neither deepspeed (the config is checked where deepspeed is not installed) nor,
at run time, `rlhf_cluster.config`: `rlhf_cluster.job.preflight` calls `check_user_json` before a job starts.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from rlhf_cluster.config import DeepSpeedBackend, LearnerConfig

# The batch bookkeeping DeepSpeed is given: one micro-batch per `engine.backward` call and no
# accumulation of its own (the learner marks the accumulation boundary itself).
MICRO_BATCH_PER_RANK = 1
ACCUMULATION_STEPS = 1
# AdamW parameters a user JSON may set in its `optimizer.params` besides lr and weight_decay.
HONOURED_ADAMW_PARAMS = ("betas", "eps")


class DeepSpeedJSONError(ValueError):
    """The user's DeepSpeed JSON is missing, unreadable or conflicts with the learner settings."""


def read_user_json(path: str | Path) -> dict[str, Any]:
    """The user's DeepSpeed config file as a dict; a clear error when missing or not a JSON object."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DeepSpeedJSONError(f"learner.backend.config_file {path}: file does not exist")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeepSpeedJSONError(f"learner.backend.config_file {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DeepSpeedJSONError(
            f"learner.backend.config_file {path}: expected a JSON object at the top level, got {type(data).__name__}"
        )
    return data


def _conflict(path, field: str, got: Any, expected: str) -> DeepSpeedJSONError:
    return DeepSpeedJSONError(f"learner.backend.config_file {path}: field {field!r} is {got!r}; expected {expected}")


def _check_setting(
    path, section: dict[str, Any], field: str, want: Any, setting: str, read: Callable[[Any], Any] = float
) -> None:
    """The JSON's `field` (its last part a key of `section`) may be absent or, read by `read`, equal
    `want`: the value of the learner's `setting`."""
    key = field.rsplit(".", 1)[-1]
    if key in section and read(section[key]) != want:
        raise _conflict(path, field, section[key], f"absent or {setting} = {want}")


def _offload_device(user_zero: dict, key: str) -> str | None:
    section = user_zero.get(key)
    if section is None:
        return None
    if not isinstance(section, dict):
        return "invalid"
    return str(section.get("device", "none")).lower()


def _deepspeed_backend(lc: LearnerConfig) -> DeepSpeedBackend:
    """`lc.backend`, a `DeepSpeedBackend`: both callers only get here for `learner.backend: deepspeed`
    (preflight checks its class, `DeepSpeedLearner` is built for it). A cast, not an `isinstance`:
    this module does not import `rlhf_cluster.config` at run time."""
    return cast("DeepSpeedBackend", lc.backend)


def check_user_json(user: dict[str, Any], path: str | Path, lc: LearnerConfig, world_size: int) -> None:
    """Raise `DeepSpeedJSONError` for every setting of `user` that contradicts the learner config."""
    _check_batch_and_precision(user, path, lc, world_size)
    _check_optimizer(user, path, lc)
    _check_zero(user, path, lc)


def _check_batch_and_precision(user: dict[str, Any], path: str | Path, lc: LearnerConfig, world_size: int) -> None:
    """What the learner drives itself: batch sizes, accumulation, clipping, the schedule, precision."""
    expected_batch = {
        "train_micro_batch_size_per_gpu": (MICRO_BATCH_PER_RANK, "the learner cuts micro-batches by token budget"),
        "gradient_accumulation_steps": (
            ACCUMULATION_STEPS,
            "the learner accumulates micro-batches itself (learner.max_tokens_per_micro_batch)",
        ),
        "train_batch_size": (MICRO_BATCH_PER_RANK * ACCUMULATION_STEPS * world_size, "1 x 1 x learner.world_size"),
    }
    for field, (value, why) in expected_batch.items():
        if field in user and user[field] != value:
            raise _conflict(path, field, user[field], f"absent or {value} ({why})")
    _check_setting(path, user, "gradient_clipping", lc.max_grad_norm, "learner.max_grad_norm")
    if "scheduler" in user:
        raise _conflict(
            path,
            "scheduler",
            user["scheduler"],
            "absent (the schedule is learner.lr with learner.lr_warmup_steps and learner.lr_schedule)",
        )
    fp16 = user.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled", False):
        raise _conflict(path, "fp16.enabled", fp16["enabled"], "absent or false (use learner.mixed_precision: bf16)")
    want_bf16 = lc.mixed_precision == "bf16"
    for key in ("bf16", "bfloat16"):
        section = user.get(key)
        if isinstance(section, dict) and "enabled" in section and bool(section["enabled"]) != want_bf16:
            raise _conflict(
                path,
                f"{key}.enabled",
                section["enabled"],
                f"absent or {str(want_bf16).lower()} (learner.mixed_precision: {lc.mixed_precision})",
            )
        if isinstance(section, dict) and section.get("check_grad_overflow") is False:
            # Without it ZeRO 1/2 would apply a bf16 step with a NaN/inf gradient.
            raise _conflict(
                path, f"{key}.check_grad_overflow", False, "absent or true (the learner skips non-finite steps)"
            )
    if user.get("zero_allow_untested_optimizer") is False:
        raise _conflict(
            path, "zero_allow_untested_optimizer", False, "absent or true (the learner passes torch's AdamW)"
        )


def _check_optimizer(user: dict[str, Any], path: str | Path, lc: LearnerConfig) -> None:
    """The optimizer, when the JSON names one: AdamW at the learner's lr and weight decay."""
    optimizer = user.get("optimizer")
    if optimizer is None:
        return
    if not isinstance(optimizer, dict) or str(optimizer.get("type", "")).lower() != "adamw":
        got = optimizer.get("type") if isinstance(optimizer, dict) else optimizer
        raise _conflict(path, "optimizer.type", got, "absent or 'AdamW' (the learner's optimizer is AdamW)")
    params = optimizer.get("params", {})
    _check_setting(path, params, "optimizer.params.lr", lc.lr, "learner.lr")
    _check_setting(path, params, "optimizer.params.weight_decay", lc.weight_decay, "learner.weight_decay")
    for key in params:
        if key not in ("lr", "weight_decay", *HONOURED_ADAMW_PARAMS):
            raise _conflict(
                path,
                f"optimizer.params.{key}",
                params[key],
                f"only lr, weight_decay, {', '.join(HONOURED_ADAMW_PARAMS)}",
            )


def _check_zero(user: dict[str, Any], path: str | Path, lc: LearnerConfig) -> None:
    """`zero_optimization`: the stage and the offloading of `learner.backend`."""
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise _conflict(path, "zero_optimization", zero, "a JSON object")
    ds = _deepspeed_backend(lc)
    _check_setting(path, zero, "zero_optimization.stage", ds.zero_stage, "learner.backend.zero_stage", read=lambda v: v)
    for key, flag, name in (
        ("offload_optimizer", ds.offload_optimizer, "offload_optimizer"),
        ("offload_param", ds.offload_params, "offload_params"),
    ):
        device = _offload_device(zero, key)
        if device is None:
            continue
        if device == "invalid":
            raise _conflict(path, f"zero_optimization.{key}", zero[key], "a JSON object with a 'device'")
        if (device != "none") != flag:
            raise _conflict(
                path,
                f"zero_optimization.{key}.device",
                device,
                f"{'cpu or nvme' if flag else 'none'} to agree with learner.backend.{name}: {str(flag).lower()} "
                f"(switch offloading with learner.backend.{name})",
            )


def engine_config(lc: LearnerConfig, world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config dict for `deepspeed.initialize` and the keyword arguments of torch's AdamW.

    The user's JSON (if any) is the base; the learner's settings are written over it after
    `check_user_json` has made sure they agree.
    """
    ds = _deepspeed_backend(lc)
    user: dict[str, Any] = {}
    if ds.config_file:
        user = read_user_json(ds.config_file)
        check_user_json(user, ds.config_file, lc, world_size)
    config = copy.deepcopy(user)
    optimizer = config.pop("optimizer", None) or {}
    adamw: dict[str, float | tuple[float, ...]] = {"lr": lc.lr, "weight_decay": lc.weight_decay}
    for key in HONOURED_ADAMW_PARAMS:
        if key in optimizer.get("params", {}):
            value = optimizer["params"][key]
            adamw[key] = tuple(value) if key == "betas" else float(value)

    config.update(
        train_micro_batch_size_per_gpu=MICRO_BATCH_PER_RANK,
        gradient_accumulation_steps=ACCUMULATION_STEPS,
        train_batch_size=MICRO_BATCH_PER_RANK * ACCUMULATION_STEPS * world_size,
        gradient_clipping=lc.max_grad_norm,
        # torch's AdamW is the optimizer: no DeepSpeed op has to be compiled for it.
        zero_allow_untested_optimizer=True,
    )
    config.setdefault("steps_per_print", 2**31 - 1)  # the driver logs steps; keep DeepSpeed quiet
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = ds.zero_stage
    if ds.offload_optimizer:
        # torch's AdamW steps the CPU copies; DeepSpeedCPUAdam would need a compiled op, so
        # DeepSpeed's insistence on it is switched off.
        zero.setdefault("offload_optimizer", {"device": "cpu"})
        config["zero_force_ds_cpu_optimizer"] = False
    if ds.offload_params:
        zero.setdefault("offload_param", {"device": "cpu"})
    if lc.mixed_precision == "bf16":
        config.setdefault("bfloat16" if "bfloat16" in config else "bf16", {})["enabled"] = True
        # bf16 compute, fp32 gradient reduction (as the FSDP2 backend does) unless the JSON says otherwise.
        config.setdefault("communication_data_type", "fp32")
    return config, adamw
