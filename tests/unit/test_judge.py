"""LLM-as-judge rewards' pure parts: templates, verdict parsers, the failure policy, and how the
judge's value joins the other sources'; the config's and preflight's refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rlhf_cluster.config import JobConfig
from rlhf_cluster.job import judge as judge_rules
from rlhf_cluster.scoring.judge import (
    JUDGE_FAILED,
    JudgeError,
    VerdictReader,
    check_template,
    parse_verdict,
    render,
    render_group,
    with_judge,
)
from rlhf_cluster.scoring.rewards import FAILED, weighted_rule


@pytest.mark.parametrize(
    ("reply", "expected"),
    [(" Yes, it is.", 1.0), ("no", 0.0), ("The answer is WRONG", 0.0), ("correct!", 1.0), ("maybe", None), ("", None)],
)
def test_yes_no_reads_the_first_verdict_word(reply, expected):
    assert parse_verdict("yes_no", reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("7", 0.7), ("Score: 10", 1.0), ("3 out of 10... I say 4", 0.4), ("0", 0.0), ("12", None), ("none", None),
     ("8.5", 0.85)],
)
def test_score_0_10_reads_the_last_number_in_range(reply, expected):
    got = parse_verdict("score_0_10", reply)
    assert got is None if expected is None else got == pytest.approx(expected)


def test_choice_gives_the_picked_response_one_and_the_rest_zero():
    assert parse_verdict("choice", "Best: 2", choices=3) == [0.0, 1.0, 0.0]
    assert parse_verdict("choice", "[4]", choices=3) is None  # out of range
    assert parse_verdict("choice", "none", choices=3) is None
    with pytest.raises(ValueError, match="verdict"):
        parse_verdict("stars", "5")


def test_templates_render_and_refuse_what_a_sample_cannot_fill():
    assert render("Q {prompt} A {answer} R {response}", "1+1", "2", "2") == "Q 1+1 A 2 R 2"
    assert "[2] b" in render_group("best_of_group", "q", "a", ["a", "b"])
    assert "{prompt}" in check_template("correctness", group=False)
    with pytest.raises(ValueError, match=r"\{reasoning\}"):
        check_template("{prompt} {response} {reasoning}", group=False)
    with pytest.raises(ValueError, match=r"must include \{response\}"):
        check_template("{prompt} {answer}", group=False)
    with pytest.raises(ValueError, match=r"\{responses\}"):
        check_template("correctness", group=True)


def test_the_judges_value_joins_the_reward_and_a_failed_verdict_drops_the_sample():
    scores = [(0.0, {"rule": 1.0}), (0.0, {"rule": 0.0}), (0.0, {"rule": 1.0})]
    out, metrics = with_judge(scores, [1.0, None, 0.0], weight=2.0, name="j")
    assert out[0] == (2.0, {"rule": 1.0, "judge/j": 1.0, JUDGE_FAILED: 0.0})
    assert out[1][0] == 0.0 and out[1][1][FAILED] == 1.0 and out[1][1][JUDGE_FAILED] == 1.0
    assert metrics["judge/judged_fraction"] == pytest.approx(2 / 3)
    assert metrics["judge/agreement_with_rule"] == 0.5  # agrees on the first, not on the third
    with pytest.raises(ValueError, match="2 verdicts for 3 samples"):
        with_judge(scores, [1.0, 0.0], 1.0, "j")


def test_a_rule_beside_a_judge_is_recorded_at_its_weight():
    rule = [(1.0, {"correct": 1.0})]
    assert weighted_rule(rule, 1.0) is rule
    assert weighted_rule(rule, 0.0) == [(0.0, {"correct": 1.0, "rule": 1.0})]


def test_unreadable_replies_are_counted_and_dropped_until_the_judge_is_broken():
    reader = VerdictReader("j", "yes_no", "drop", max_failure_fraction=1.0, failure_window=10)
    assert reader.read("yes", "p") == 1.0
    assert reader.read("hmm", "p") is None and reader.read(RuntimeError("engine died"), "p") is None
    assert (reader.parsed, reader.unparseable, reader.errors) == (1, 1, 1)
    # It has worked: with max_failure_fraction 1 a stretch of unreadable replies costs their samples only.
    assert all(reader.read("hmm", "p") is None for _ in range(40))
    mute = VerdictReader("j", "yes_no", "drop", max_failure_fraction=1.0, failure_window=10)
    with pytest.raises(JudgeError, match="32 samples in a row"):  # never read one
        for _ in range(40):
            mute.read("hmm", "p")
    strict = VerdictReader("j", "yes_no", "fail")
    with pytest.raises(JudgeError, match=r"judge 'j' failed on prompt 'p7': no yes_no verdict in the reply 'hmm'"):
        strict.read("hmm", "p7")


def _cfg(**judge) -> JobConfig:
    return JobConfig.model_validate({"scoring": {"rewards": [{"type": "verifier", "weight": 0.0},
                                                             {"type": "judge", "model": "/nowhere", **judge}]}})


def test_the_config_places_the_judge_beside_the_rule_and_refuses_a_mismatched_verdict():
    cfg = _cfg()
    assert cfg.scoring.judge_source is not None
    assert cfg.scoring.rule_source is not None and cfg.scoring.rule_source.type == "verifier"
    assert cfg.scoring.rule_source.weight == 0.0
    with pytest.raises(ValidationError, match="needs group: true"):
        _cfg(verdict="choice")
    with pytest.raises(ValidationError, match="at most one `judge` source"):
        JobConfig.model_validate({"scoring": {"rewards": [{"type": "judge", "model": "a"}, {"type": "judge", "model": "b"}]}})


def test_preflight_names_a_bad_template_and_a_missing_judge_folder():
    assert judge_rules.rules(_cfg()) == []
    (problem,) = judge_rules.rules(_cfg(template="{prompt} only"))
    assert problem.startswith("scoring.rewards[1] (judge 'judge').template:") and "{response}" in problem
    (missing,) = judge_rules.folder_problems(_cfg())
    assert missing.startswith("scoring.rewards[1] (judge 'judge').model:") and "/nowhere" in missing


def test_the_dry_run_shows_the_judges_prompt_for_the_first_prompt():
    from rlhf_cluster.job.preview import first_prompt, preview

    cfg = _cfg(template="Q: {prompt} R: {response} A: {answer}")
    prompt = first_prompt(cfg)
    (line,) = [x for x in preview(cfg).lines if x.startswith("judge ")]
    assert f"Q: {prompt.text} R: <response> A: {prompt.answer}" in line and "verdict yes_no" in line


def test_the_judge_decodes_without_the_policys_sampling_filters():
    """Found in review: the judge's engine settings copy `generation`, so a policy's repetition
    penalty (kept by vLLM for greedy answers) would push the verdict's words down in every judgement."""
    from actors.workers.settings import JudgeSettings

    cfg = JobConfig.model_validate(
        {
            "generation": {
                "sampling": {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3, "ignore_eos": True, "top_p": 0.9}
            },
            "scoring": {"rewards": [{"type": "judge", "model": "/models/judge"}]},
        }
    )
    sampling = JudgeSettings.of(cfg).engine.sampling
    assert (sampling.top_k, sampling.min_p, sampling.repetition_penalty, sampling.ignore_eos) == (0, 0.0, 1.0, False)
    assert cfg.generation.sampling.repetition_penalty == 1.3  # the policy's own are unchanged
