"""Preflight of prompts with images: a text-only policy (the tiny model's architecture, or a
model folder whose config has no vision_config) and images without the chat template are
refused, naming the setting; a vision-language policy passes."""

from __future__ import annotations

import json

import pytest

from rlhf_cluster.config import ConfigError, JobConfig
from rlhf_cluster.job import images
from rlhf_cluster.job.preflight import CONFIG_RULES, FILE_CHECKS, preflight


def _job(data: dict, model: dict | None = None) -> JobConfig:
    return JobConfig.model_validate({"data": data, "model": model or {}})


def _folder(tmp_path, name: str, config: dict) -> str:
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    return str(tmp_path / name)


def test_registered_in_preflight():
    assert images.rules in CONFIG_RULES and images.file_checks in FILE_CHECKS


def test_a_visual_task_with_the_text_only_tiny_model_is_refused():
    with pytest.raises(ConfigError) as info:
        preflight(_job({"task": "visual_count"}), files=False)
    message = str(info.value)
    assert "data.task=visual_count: the prompts have images and the policy is a text-only model" in message
    assert "model.tiny.architecture=qwen2" in message and "qwen2_5_vl" in message
    assert "set data.chat_template: true" in message
    assert images.rules(_job({"task": "arithmetic"})) == []


def test_a_vision_language_tiny_model_passes():
    cfg = _job({"task": "visual_color", "chat_template": True}, {"tiny": {"architecture": "qwen2_5_vl"}})
    assert images.rules(cfg) == [] and preflight(cfg, files=False) == []


def test_an_image_column_with_a_text_only_folder_is_refused(tmp_path):
    data = {
        "path": str(tmp_path / "p.parquet"),
        "columns": {"images": "img"},
        "chat_template": True,
        "verifier": "exact",
    }
    text_only = _folder(tmp_path, "text", {"model_type": "qwen2", "hidden_size": 64})
    cfg = _job(data, {"path": text_only})
    assert images.rules(cfg) == []  # a folder is judged by its config
    (problem,) = images.file_checks(cfg)
    assert problem.startswith("data.columns.images=img: the prompts have images and model.path")
    assert "has no vision_config" in problem
    vlm = _folder(tmp_path, "vlm", {"model_type": "qwen2_5_vl", "vision_config": {"depth": 2}})
    nested = _folder(tmp_path, "nested", {"model_type": "llava", "text_config": {"vision_config": {}}})
    assert images.file_checks(_job(data, {"path": vlm})) == []
    assert images.file_checks(_job(data, {"path": nested})) == []
    assert images.file_checks(_job(data, {"path": str(tmp_path / "absent")})) == []  # model.path's own check names it
    no_images = {k: v for k, v in data.items() if k != "columns"}
    assert images.file_checks(_job(no_images, {"path": text_only})) == []


def test_an_image_column_without_the_chat_template_is_refused(tmp_path):
    data = {"path": str(tmp_path / "p.parquet"), "columns": {"images": "img"}, "verifier": "exact"}
    vlm = _folder(tmp_path, "vlm", {"vision_config": {}})
    (problem,) = images.rules(_job(data, {"path": vlm}))
    assert problem.startswith("data.columns.images=img:") and "data.chat_template: true" in problem


def test_the_images_placebo_needs_images():
    (problem,) = images.rules(_job({"task": "arithmetic", "placebo_images": True}))
    assert problem.startswith("data.placebo_images") and "data.columns.images" in problem


def test_prompt_tokens_count_each_image_as_the_tokens_it_expands_to(tmp_path):
    import io

    from PIL import Image

    from rlhf_cluster.data.images import image_tokens
    from rlhf_cluster.data.prompts import Prompt
    from rlhf_cluster.job.images import folder_pixels, pixel_limits, prompt_tokens

    out = io.BytesIO()
    Image.new("RGB", (112, 56), "red").save(out, format="PNG")

    class Words:  # a tokenizer of one id per word
        def __call__(self, text):
            return {"input_ids": list(range(len(text.split())))}

    text = Prompt("p", "<|image_pad|> how many dots", "3")
    seen = Prompt("p", "<|image_pad|> how many dots", "3", images=(out.getvalue(),))
    assert prompt_tokens(text, Words(), (None, None)) == 4
    assert prompt_tokens(seen, Words(), (None, None)) == 4 - 1 + 8  # 112x56 pixels: 4x2 cells of 28x28
    assert prompt_tokens(seen, Words(), (None, 3136)) == 4 - 1 + image_tokens(112, 56, None, 3136) == 5
    folder = _folder(tmp_path, "vlm", {"vision_config": {}})
    (tmp_path / "vlm" / "processor_config.json").write_text(
        '{"image_processor": {"size": {"shortest_edge": 784, "longest_edge": 12544}}}'
    )
    assert folder_pixels(folder) == (784, 12544)
    assert pixel_limits(_job({"max_pixels": 3136}), folder) == (784, 3136)  # the data's limit over the folder's


def test_only_an_engine_of_a_vision_language_model_takes_images(tmp_path):
    from actors.workers.settings import GenerationSettings

    settings = GenerationSettings.of(_job({"max_images_per_prompt": 2, "max_pixels": 3136}))
    vlm, text = _folder(tmp_path, "vlm", {"vision_config": {}}), _folder(tmp_path, "text", {"model_type": "qwen2"})
    images = settings.engine_images(vlm)
    assert images is not None and (images.max_per_prompt, images.processor_kwargs) == (2, {"max_pixels": 3136})
    assert settings.engine_images(text) is None
    from actors.workers.settings import ScoringSettings

    assert ScoringSettings.of(_job({"max_pixels": 3136})).pixels == (None, 3136)  # the reference's processor too
    from actors.workers.settings import JudgeSettings

    judged = JobConfig.model_validate(
        {"data": {"max_images_per_prompt": 3}, "scoring": {"rewards": [{"type": "judge", "model": vlm}]}}
    )
    assert JudgeSettings.of(judged).images.max_per_prompt == 3  # a judge's engine takes the samples' images


@pytest.mark.parametrize(
    "learner, critic, named",
    [
        ({"backend": {"type": "deepspeed", "zero_stage": 3}, "world_size": 2}, False, "learner.backend.type=deepspeed"),
        ({"world_size": 2, "sequence_parallel": 2}, False, "learner.sequence_parallel=2"),
        ({}, True, "critic: the PPO critic's value model is text-only"),
    ],
)
def test_what_a_vision_language_policy_does_not_run_with_is_refused(tmp_path, learner, critic, named):
    extra = {"critic": {}, "algorithm": {"advantage": "gae"}} if critic else {}
    tiny = JobConfig.model_validate(
        {
            "model": {"tiny": {"architecture": "qwen2_5_vl"}},
            "data": {"task": "visual_color", "chat_template": True},
            "learner": learner,
            **extra,
        }
    )
    assert any(named in problem for problem in images.rules(tiny))
    folder = _folder(tmp_path, "vlm", {"vision_config": {}})
    text_data = JobConfig.model_validate({"model": {"path": folder}, "learner": learner, **extra})
    assert any(named in problem for problem in images.file_checks(text_data))  # a VLM folder, whatever its data
    text_policy = JobConfig.model_validate({"learner": learner, **extra})
    assert not [p for p in images.rules(text_policy) if named in p]
