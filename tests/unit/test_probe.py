"""The mismatch probe's estimators and its jump alarm."""

from __future__ import annotations

import math

import torch

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.probe import MismatchAlarm, Probe, build_probe, mismatch, parse_probe_file, probe_file


def test_mismatch_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    learner = [(-torch.rand(n, generator=g, dtype=torch.float64) * 3).tolist() for n in (3, 5, 1)]
    engine = [[x + 0.05 * (i % 3 - 1) for i, x in enumerate(row)] for row in learner]
    delta = torch.tensor([a - b for ra, rb in zip(learner, engine) for a, b in zip(ra, rb)], dtype=torch.float64)
    out = mismatch(learner, engine)
    assert out.tokens == 9
    assert math.isclose(out.k1, float((-delta).mean()), abs_tol=1e-12)
    assert math.isclose(out.k3, float((delta.exp() - 1 - delta).mean()), rel_tol=1e-9)
    assert math.isclose(out.max_abs_diff, 0.05, rel_tol=1e-9)
    assert mismatch(learner, learner).k3 == 0.0


def test_alarm_flags_a_jump_over_the_median_and_the_floor():
    alarm = MismatchAlarm(factor=4.0, floor=1e-3)
    assert not alarm.observe(2e-3)  # nothing to compare with yet
    assert not alarm.observe(3e-3)
    assert not alarm.observe(9e-3)  # < 4 x median(2e-3, 3e-3)
    assert alarm.observe(5e-2)
    tiny = MismatchAlarm(factor=4.0, floor=1e-3)
    assert not tiny.observe(1e-12)
    assert not tiny.observe(1e-8), "a relative jump far below the floor is fp32 noise"


class _Tokenizer:
    eos_token_id = 1

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def test_probe_is_prompt_plus_reference_answer_and_round_trips():
    prompts = [Prompt("a", "1+1=", "2"), Prompt("b", "2+3=", "5"), Prompt("c", "4+4=", "8")]
    probe = build_probe(prompts, _Tokenizer(), 2)
    assert len(probe) == 2
    assert probe.prompt_ids[1] == [ord(c) for c in "2+3="] and probe.response_ids[1] == [ord("5"), 1]
    back, logprobs = parse_probe_file(probe_file(probe, [[-0.5, -0.1], [-0.2, -0.3]]))
    assert back == Probe(probe.prompt_ids, probe.response_ids) and logprobs[1] == [-0.2, -0.3]
