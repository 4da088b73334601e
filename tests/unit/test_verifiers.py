"""The built-in verifiers on strings in the formats they meet: GSM8K answers, MATH-style boxed
answers, and model responses that get them right, nearly right and wrong."""

import pytest

from rlhf_cluster.config import ConfigError, load_config
from rlhf_cluster.data.verifiers import build_verifier, gsm8k_reference, last_boxed, normalize_math
from rlhf_cluster.scoring.rewards import RuleReward

# A GSM8K answer column, verbatim in format (calculator annotations, `#### N`).
GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def _correct(name, response, answer, pattern=None):
    verify, _ = build_verifier(name, pattern)
    return verify(response, answer)["correct"]


def test_gsm8k_reference_is_after_the_last_marker():
    assert gsm8k_reference(GSM8K_ANSWER) == "72"
    assert gsm8k_reference("#### 1,234") == "1,234"
    assert gsm8k_reference("42") == "42"  # already a bare answer


@pytest.mark.parametrize("response, correct", [
    ("She sold 24 in May, so 48 + 24 = 72 in total.\n#### 72", 1.0),
    ("#### 72.", 1.0),
    ("The answer is 72", 1.0),                       # no marker: the last number
    ("She sold 72 clips. Wait, 48+24=73", 0.0),      # the last number is the answer given
    ("#### 72\nSo 3 more.", 1.0),                    # after the marker: its first number
    ("#### $72.00", 1.0),                            # dollars and decimals compare by value
    ("#### 720", 0.0),
    ("no number at all", 0.0),
    ("", 0.0),
])
def test_gsm8k_verifier(response, correct):
    assert _correct("gsm8k", response, GSM8K_ANSWER) == correct


def test_gsm8k_thousands_separators_and_negatives():
    assert _correct("gsm8k", "The total is 1,000,000.", "#### 1000000") == 1.0
    assert _correct("gsm8k", "#### 1000000", "#### 1,000,000") == 1.0
    assert _correct("gsm8k", "It drops by -5 degrees", "#### -5") == 1.0
    assert _correct("gsm8k", "#### 5", "#### -5") == 0.0


@pytest.mark.parametrize("text, boxed", [
    ("so x = \\boxed{3}", "3"),
    ("\\boxed{\\frac{1}{2}} then \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # the last, nested braces
    ("\\fbox{7}", "7"),
    ("\\boxed {10}", "10"),
    ("cut off \\boxed{\\frac{1}{", None),
    ("no box", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


def test_normalize_math_spellings():
    assert normalize_math("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize_math("\\dfrac{3}{4}") == normalize_math("\\frac{3}{4}") == "\\frac{3}{4}"
    assert normalize_math("x = 5.") == "5"
    assert normalize_math("10\\text{ cm}") == "10cm"


@pytest.mark.parametrize("response, answer, correct", [
    ("The area is $\\boxed{\\dfrac{3}{4}}$.", "\\frac{3}{4}", 1.0),
    ("\\boxed{x = 2}", "2", 1.0),
    ("\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", 0.0),  # different spellings of a fraction are not equated
    ("\\boxed{2.50}", "2.5", 1.0),                  # numbers by value
    ("\\boxed{(1, 2)}", "\\left(1,2\\right)", 1.0),
    ("the answer is 3/4", "\\frac{3}{4}", 0.0),      # no box, no credit
    ("\\boxed{4}", "Solution ... so \\boxed{4}.", 1.0),  # the reference's own box
])
def test_boxed_verifier(response, answer, correct):
    assert _correct("boxed", response, answer) == correct


def test_exact_and_regex_verifiers():
    assert _correct("exact", "  Paris\n", "Paris") == 1.0
    assert _correct("exact", "paris", "Paris") == 0.0
    pattern = r"[Aa]nswer:\s*(\S+)"
    assert _correct("regex", "thinking... Answer: 12", "12", pattern) == 1.0
    assert _correct("regex", "Answer: 11 ... answer: 12", "12", pattern) == 1.0  # the last match
    assert _correct("regex", "12", "12", pattern) == 0.0
    assert _correct("regex", "result=12", "12", r"\d+") == 1.0  # no group: the whole match


def test_rule_reward_uses_the_configured_verifier():
    cfg = load_config(None, ["data.verifier=gsm8k"])
    reward = RuleReward(cfg.data.verifier_name, pattern=cfg.data.verifier_pattern)
    assert reward.weights == {"correct": 1.0}
    assert load_config(None, []).data.verifier_name == "arithmetic"  # the built-in task's


def test_verifier_settings_are_checked():
    with pytest.raises(ConfigError, match="data.verifier_pattern"):
        load_config(None, ["data.verifier=regex"])
    with pytest.raises(ConfigError, match="data.verifier_pattern"):
        load_config(None, ["data.verifier=exact", "data.verifier_pattern=x"])
    with pytest.raises(ConfigError, match="data.verifier"):
        load_config(None, ["data.verifier=poetry"])
    with pytest.raises(ValueError, match="data.verifier: unknown verifier"):
        build_verifier("poetry")
