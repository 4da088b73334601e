"""`generation.sampling.top_k`, `min_p` and `repetition_penalty` (veRL rollout.top_k, TRL top_k /
min_p / repetition_penalty, OpenRLHF --top_k, slime --rollout-top-k), and `data.eval_sampling`'s
over them: bounds named by field, and the vLLM `SamplingParams` the engine builds for a group's
responses and for an episode's turn. On a real engine: tests/integration/test_engine_sampling_filters.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from actors.workers.settings import GenerationSettings
from rlhf_cluster.config import GenerationConfig, JobConfig, SamplingConfig
from rlhf_cluster.generation.engine import VLLMEngine


def _job(sampling: dict | None = None, eval_sampling: dict | None = None, **generation) -> JobConfig:
    return JobConfig.model_validate(
        {
            "generation": {"sampling": sampling or {}, **generation},
            "data": {"eval_sampling": eval_sampling or {}},
        }
    )


def _fake_engine(cfg: GenerationConfig):
    """What `_sampling_params` and `submit_turn` read of an engine; `_submit` hands back the requests."""
    text_only = SimpleNamespace(model_config=SimpleNamespace(is_multimodal_model=False))
    return SimpleNamespace(cfg=cfg, engine=text_only, _submit=lambda requests, finish, **kw: requests)


def _group(cfg: GenerationConfig, greedy: bool = False, sampling: SamplingConfig | None = None):
    return VLLMEngine._sampling_params(_fake_engine(cfg), 3, greedy, None, sampling)  # type: ignore[arg-type]


def _turn(cfg: GenerationConfig, greedy: bool = False):
    ((_, params),) = VLLMEngine.submit_turn(_fake_engine(cfg), [5, 6, 7], 4, ["</x>"], greedy)  # type: ignore[arg-type]
    return params


def _filters(params) -> tuple:
    return params.top_k, params.min_p, params.repetition_penalty


def test_the_defaults_are_off_and_are_vllms_own():
    from vllm import SamplingParams

    s = SamplingConfig()
    assert (s.top_k, s.min_p, s.repetition_penalty) == (0, 0.0, 1.0)
    default = SamplingParams()
    for params in (*_group(GenerationConfig()), _turn(GenerationConfig())):
        assert _filters(params) == _filters(default) == (0, 0.0, 1.0)


@pytest.mark.parametrize(
    "field,bad,good",
    [
        ("top_k", -2, -1),
        ("top_k", 2.5, 1),
        ("min_p", -0.1, 0.0),
        ("min_p", 1.5, 1.0),
        ("repetition_penalty", 0.0, 0.5),
        ("repetition_penalty", -1.0, 2.0),
        ("repetition_penalty", math.inf, 100.0),
        ("repetition_penalty", math.nan, 1.0),
    ],
)
def test_a_bad_value_is_refused_naming_the_field_in_both_sections(field, bad, good):
    with pytest.raises(ValueError, match=f"generation.sampling.{field}"):
        _job(sampling={field: bad})
    with pytest.raises(ValueError, match=f"data.eval_sampling.{field}"):
        _job(eval_sampling={field: bad})
    job = _job(sampling={field: good}, eval_sampling={field: good})  # the bound's other side
    assert getattr(job.generation.sampling, field) == getattr(job.data.eval_sampling, field) == good


def test_min_p_with_speculative_decoding_is_refused_by_name():
    """vLLM refuses min_p under speculative decoding request by request: here at load instead."""
    with pytest.raises(ValueError, match=r"generation.sampling.min_p: .*speculative"):
        _job(sampling={"min_p": 0.05}, speculative={"method": "ngram"})
    assert _job(sampling={"top_k": 20, "repetition_penalty": 1.1}, speculative={"method": "ngram"})
    with pytest.raises(ValueError, match=r"data.eval_sampling.min_p: .*speculative"):
        _job(eval_sampling={"min_p": 0.05}, speculative={"method": "ngram"})
    assert _job(eval_sampling={"min_p": 0.0}, speculative={"method": "ngram"})


def test_a_groups_and_a_turns_params_carry_them():
    cfg = _job(sampling={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3, "temperature": 0.7}).generation
    group = _group(cfg)
    assert len(group) == 3 and all(_filters(p) == (20, 0.05, 1.3) for p in group)
    assert _filters(_turn(cfg)) == (20, 0.05, 1.3)
    assert group[0].temperature == _turn(cfg).temperature == 0.7
    # -1, the other "off" vLLM takes (veRL's and slime's default), reaches it as vLLM's preferred 0.
    off = _job(sampling={"top_k": -1}).generation
    assert _group(off)[0].top_k == _turn(off).top_k == 0


def test_greedy_keeps_the_repetition_penalty_which_alone_changes_an_argmax():
    cfg = _job(sampling={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3}).generation
    for params in (*_group(cfg, greedy=True), _turn(cfg, greedy=True)):
        assert params.temperature == 0.0 and _filters(params) == (0, 0.0, 1.3)  # vLLM drops the others


def test_held_out_evaluation_samples_with_its_own_over_trainings():
    cfg = _job(
        sampling={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3},
        eval_sampling={"top_k": -1, "repetition_penalty": 1.0},
    )
    evaluation = GenerationSettings.of(cfg).eval_sampling
    assert (evaluation.top_k, evaluation.min_p, evaluation.repetition_penalty) == (-1, 0.05, 1.0)
    assert all(_filters(p) == (0, 0.05, 1.0) for p in _group(cfg.generation, sampling=evaluation))
    # Unset, training's; the turns (episodes: no eval_sampling) always training's.
    assert GenerationSettings.of(_job(sampling={"top_k": 7})).eval_sampling.top_k == 7
    assert _group(cfg.generation)[0].top_k == 20
