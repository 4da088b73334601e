"""Preflight of prompts with images (`data.columns.images`, or a built-in visual task): the
policy must be a vision-language model, and the chat template places the images.

A text-only model cannot take an image, and nothing else turns a prompt's images into the
placeholder tokens the model's processor expands: the chat template writes one per image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

from rlhf_cluster.config import JobConfig
from rlhf_cluster.config.inputs import VISION_ARCHITECTURES
from rlhf_cluster.data.images import image_size, image_tokens
from rlhf_cluster.data.prompts import Prompt
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
    the images placebo without images, and a tiny vision-language policy's `policy_rules`."""
    setting = image_setting(cfg)
    out = policy_rules(cfg, cfg.model.path is None and cfg.model.tiny.is_vision)
    if setting is None:
        if cfg.data.placebo_images:
            out.append(
                "data.placebo_images shuffles the prompts' images, and they have none: set data.columns.images "
                "(or a visual data.task)"
            )
        return out
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


def policy_rules(cfg: JobConfig, vision: bool) -> list[str]:
    """What a vision-language policy (`vision`) does not run with yet, named: DeepSpeed on several
    ranks (ZeRO-3 gathers a module's weights only where it runs, and a rank whose micro-batch holds
    no image skips the vision tower the others run), sequence parallelism (rows with images are
    never packed; it splits packed rows), and a PPO critic (its value model is text-only)."""
    if not vision:
        return []
    lc, out = cfg.learner, []
    if lc.backend.type == "deepspeed" and lc.world_size > 1:
        out.append(
            f"learner.backend.type=deepspeed with learner.world_size={lc.world_size}: a vision-language policy trains "
            "on one DeepSpeed rank or on fsdp2 (a rank without images would skip the vision tower's gathers)"
        )
    if lc.sequence_parallel > 1:
        out.append(
            f"learner.sequence_parallel={lc.sequence_parallel}: a vision-language policy's rows with images are never "
            "packed, and sequence parallelism splits packed rows; set it to 1"
        )
    if cfg.critic is not None:
        out.append("critic: the PPO critic's value model is text-only; a vision-language policy trains without one")
    return out


def has_vision(model_path: str | Path) -> bool:
    """Whether a model folder's config.json describes a vision-language model (a `vision_config`,
    at its top level or in a nested config). Raises OSError / ValueError for an unreadable one."""
    config = json.loads((Path(model_path).expanduser() / "config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{model_path}/config.json is not a JSON object")
    return "vision_config" in config or any(isinstance(v, dict) and "vision_config" in v for v in config.values())


def file_checks(cfg: JobConfig) -> list[str]:
    """The checks that read `model.path`'s config: a vision-language folder's `policy_rules`, and a
    text-only folder for prompts with images refused, naming it."""
    if cfg.model.path is None:
        return []
    try:
        vision = has_vision(cfg.model.path)
    except (OSError, ValueError):  # an unreadable folder is `model.path`'s own check's to name
        return []
    setting = image_setting(cfg)
    if vision or setting is None:
        return policy_rules(cfg, vision)
    return [
        f"{setting}: the prompts have images and model.path {cfg.model.path} is a text-only model (its config.json "
        "has no vision_config); use a vision-language model or drop the images"
    ]


class ImageLimits(TypedDict):
    """`read_prompt_file`'s (and `read_prompts`') image limits, as keyword arguments."""

    max_image_bytes: int
    max_images: int


def image_limits(cfg: JobConfig) -> ImageLimits:
    """`read_prompt_file`'s image limits from the `data` section (bytes an image, images a row)."""
    return {"max_image_bytes": cfg.data.max_image_bytes, "max_images": cfg.data.max_images_per_prompt}


def folder_pixels(model_path: str | Path) -> tuple[int | None, int | None]:
    """The (min, max) pixels a model folder's image processor resizes images to: its
    `processor_config.json` (transformers 5) or `preprocessor_config.json` (None: not said there)."""
    folder = Path(model_path).expanduser()
    for name, nested in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        file = folder / name
        if not file.is_file():
            continue
        config = json.loads(file.read_text())
        config = config.get(nested, {}) if nested else config
        size = config.get("size") or {}
        low = config.get("min_pixels", size.get("shortest_edge"))
        high = config.get("max_pixels", size.get("longest_edge"))
        if low is not None or high is not None:
            return low, high
    return None, None


def pixel_limits(cfg: JobConfig, model_path: str | Path) -> tuple[int | None, int | None]:
    """The (min, max) pixels the job's images are resized to: `data.min_pixels` / `max_pixels`,
    else the model folder's own (what the engines' and the learner's processors both use)."""
    low, high = folder_pixels(model_path)
    return (cfg.data.min_pixels or low, cfg.data.max_pixels or high)


def prompt_tokens(prompt: Prompt, tokenizer, pixels: tuple[int | None, int | None]) -> int:
    """A prompt's tokens as the engine holds them: each image's one placeholder expanded to its
    image tokens (the size its processor resizes it to, `pixels`: min and max)."""
    expanded = sum(image_tokens(*image_size(data), *pixels) - 1 for data in prompt.images)
    return len(prompt.encode(tokenizer)) + expanded
