"""`make gpu-check`'s VLM learner step (issue 71, `benchmarks.gpu.vlm_learner`): its shape is
Qwen2.5-VL-3B's, and its body runs here at the tiny shape (`vlm-smoke`), so the GPU step cannot rot
(the CPU run of gpu-check leaves it to this test: `check.SMOKE_IN_UNIT_TEST`)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.gpu.check import SMOKE_IN_UNIT_TEST, parse_args, wanted
from benchmarks.gpu.vlm_learner import main, parameter_split, vlm_config
from rlhf_cluster.models.tiny_vlm import VISION_TOKENS


def test_the_vlm_shape_is_qwen2_5_vl_3b():
    """Built on the meta device: Qwen2.5-VL-3B-Instruct's 3,754,622,976 parameters (its safetensors'
    count), the embedding tied, the rotary sections of its config.json."""
    config = vlm_config("qwen2.5-vl-3b", {t: 2 + i for i, t in enumerate(VISION_TOKENS)}, 1, 0)
    split = parameter_split(config)
    assert (split["language"], split["vision"]) == (3_085_938_688, 668_684_288)
    assert split["language"] + split["vision"] == 3_754_622_976
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert config.vision_config.out_hidden_size == 2048 and config.vision_config.fullatt_block_indexes == [
        7,
        15,
        23,
        31,
    ]


def test_a_vlm_learner_step_at_the_smoke_shape(tmp_path: Path, model_cache):
    out = tmp_path / "vlm.json"
    argv = ["--shape", "vlm-smoke", "--rows", "2", "--reps", "1", "--warmup", "0", "--cache-dir", model_cache]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cfg, row = result["config"], result["figures"]["ours [default]"]
    # One 56x56 image a row: 2x2 merged tokens of 14-pixel patches, expanded in the prompt ids.
    assert cfg["image_tokens"] == row["image_tokens"] == 2 * 4
    assert row["seconds_per_step"] > 0 and row["real_tokens"] == cfg["real_tokens"] > row["image_tokens"]
    assert 2 * 4 <= row["response_tokens"] <= 2 * 8
    # freeze_vision by default: the optimizer holds the language model's parameters alone.
    assert row["trainable_parameters"] == cfg["language_parameters"] and cfg["vision_parameters"] > 0
    assert row["vision_forward_flops"] > 0 and row["mfu"] is None  # no peak FLOP/s on the CPU


def test_gpu_check_runs_the_vlm_step_on_a_gpu_and_leaves_its_smoke_to_this_test(tmp_path: Path):
    args = parse_args(["--out-dir", str(tmp_path)])
    assert not wanted(args, "learner VLM")  # on a GPU without --all: measured (one H200, 2026-11-28)
    args.all = True
    assert wanted(args, "learner VLM")
    args.smoke = True
    assert not wanted(args, "learner VLM") and SMOKE_IN_UNIT_TEST["learner VLM"] == f"tests/unit/{Path(__file__).name}"
    args.only = ["learner VLM"]
    assert wanted(args, "learner VLM")


def test_both_gpu_learner_benchmarks_take_the_same_side_option():
    """`--side` (benchmarks.gpu.learner.add_side_option): repeatable, NAME:KEY=VALUE read as YAML."""
    from benchmarks.gpu import learner, vlm_learner

    argv = ["--side", "ckpt:gradient_checkpointing=true", "--side", "c:compile=true,attention=sdpa"]
    sides = [("ckpt", {"gradient_checkpointing": True}), ("c", {"compile": True, "attention": "sdpa"})]
    assert learner.parse_args(argv).side == vlm_learner.parse_args(argv).side == sides
    assert learner.parse_args([]).side == vlm_learner.parse_args([]).side == []
