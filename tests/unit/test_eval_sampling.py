"""`data.eval_sampling`: held-out answers sampled with their own temperature, top_p and token limit
(found comparing with veRL's `val_kwargs`, slime's `--eval-temperature`, OpenRLHF's `--eval.temperature`:
evaluation sampled at training's settings only). What reaches vLLM: tests/integration/test_engine_text.py."""

from __future__ import annotations

import pytest

from actors.workers.settings import GenerationSettings
from rlhf_cluster.config import ConfigError, JobConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.job.inputs import check_prompt_lengths
from rlhf_cluster.job.preflight import preflight


def _cfg(**eval_sampling) -> JobConfig:
    return JobConfig.model_validate({
        "generation": {"sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "n": 4}},
        "data": {"eval_sampling": eval_sampling},
    })


def test_the_workers_evaluate_with_the_set_fields_over_trainings():
    sampling = GenerationSettings.of(_cfg(temperature=0.6, top_p=0.95)).eval_sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_new_tokens, sampling.n) == (0.6, 0.95, 16, 4)
    assert GenerationSettings.of(_cfg()).eval_sampling == _cfg().generation.sampling
    assert GenerationSettings.of(_cfg(max_new_tokens=64)).eval_sampling.max_new_tokens == 64


@pytest.mark.parametrize("field,value", [("temperature", 0.0), ("top_p", 1.5), ("max_new_tokens", 0), ("top_k", -2)])
def test_a_bad_eval_sampling_field_is_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"data.eval_sampling.{field}"):
        _cfg(**{field: value})


def test_held_out_prompts_leave_room_for_evaluations_longer_answers(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt = Prompt("p0", "12+30=", "42")
    length = len(prompt.encode(tokenizer))
    check_prompt_lengths([prompt], tokenizer, length, "eval.jsonl")  # fits exactly
    with pytest.raises(ValueError, match=r"eval.jsonl: 1 prompt\(s\) longer than generation.max_model_len - "
                                         r"data.eval_sampling.max_new_tokens"):
        check_prompt_lengths([prompt], tokenizer, length - 1, "eval.jsonl", answers="data.eval_sampling.max_new_tokens")


def test_eval_sampling_with_episodes_is_refused():
    """Episodes (an environment, an agent) sample every turn with training's settings: refused, not ignored."""
    cfg = JobConfig.model_validate({
        "data": {"task": "tool_arithmetic", "eval_sampling": {"temperature": 0.6}},
        "generation": {"environment": "calculator", "max_turns": 2},
    })
    with pytest.raises(ConfigError, match="data.eval_sampling: .*single-turn"):
        preflight(cfg, files=False)
