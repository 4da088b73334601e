"""Preflight of prompts with images (`data.columns.images`, or a built-in visual task): the
policy must be a vision-language model, and the chat template places the images.

A text-only model cannot take an image, and nothing else turns a prompt's images into the
placeholder tokens the model's processor expands: the chat template writes one per image.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_cluster.config import JobConfig
from rlhf_cluster.config.inputs import VISION_ARCHITECTURES
from rlhf_cluster.data.visual_task import VISUAL_TASKS


def image_setting(cfg: JobConfig) -> str | None:
    """The setting that gives the job's prompts images (None: text prompts only)."""
    if cfg.data.path is not None:
        return f"data.columns.images={cfg.data.columns.images}" if cfg.data.columns.images else None
    if cfg.data.task in VISUAL_TASKS:
        return f"data.task={cfg.data.task}"
    return None


def rules(cfg: JobConfig) -> list[str]:
    """The config rules (no files read): a text-only tiny policy, images without the chat template,
    and the images placebo without images."""
    setting = image_setting(cfg)
    if setting is None:
        if cfg.data.placebo_images:
            return [
                "data.placebo_images shuffles the prompts' images, and they have none: set data.columns.images "
                "(or a visual data.task)"
            ]
        return []
    out = []
    if cfg.model.path is None and not cfg.model.tiny.is_vision:
        out.append(
            f"{setting}: the prompts have images and the policy is a text-only model "
            f"(model.tiny.architecture={cfg.model.tiny.architecture}); set model.tiny.architecture to a "
            f"vision-language one ({', '.join(sorted(VISION_ARCHITECTURES))})"
        )
    if not cfg.data.chat_template:
        out.append(
            f"{setting}: the prompts have images, which the model's chat template places (one placeholder per "
            "image); set data.chat_template: true"
        )
    return out


def has_vision(model_path: str | Path) -> bool:
    """Whether a model folder's config.json describes a vision-language model (a `vision_config`,
    at its top level or in a nested config). Raises OSError / ValueError for an unreadable one."""
    config = json.loads((Path(model_path).expanduser() / "config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{model_path}/config.json is not a JSON object")
    return "vision_config" in config or any(isinstance(v, dict) and "vision_config" in v for v in config.values())


def file_checks(cfg: JobConfig) -> list[str]:
    """The check that reads `model.path`'s config: a text-only model folder is refused, naming it."""
    setting = image_setting(cfg)
    if setting is None or cfg.model.path is None:
        return []
    try:
        vision = has_vision(cfg.model.path)
    except (OSError, ValueError):  # an unreadable folder is `model.path`'s own check's to name
        return []
    if vision:
        return []
    return [
        f"{setting}: the prompts have images and model.path {cfg.model.path} is a text-only model (its config.json "
        "has no vision_config); use a vision-language model or drop the images"
    ]
