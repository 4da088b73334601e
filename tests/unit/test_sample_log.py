"""Which responses samples.jsonl keeps per step, and how they are printed."""

from __future__ import annotations

from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.run.sample_log import fewest_extremes, format_samples, pick_samples, sample_rows


class _Tokenizer:
    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def _sample(i: int, reward: float) -> ScoredSample:
    return ScoredSample(sample_id=f"s{i}", prompt_id=f"p{i}", group_id="g", prompt_ids=[1, 2], response_ids=[3, i],
                        rollout_logprobs=[-1.0, -1.0], policy_version=4, finish_reason="stop", reward=reward,
                        reward_components={"correct": reward}, ref_logprobs=[-1.0, -1.0], advantages=[0.0, 0.0])


def test_top_bottom_and_random_picks_are_distinct_and_seeded():
    samples = [_sample(i, r) for i, r in enumerate([0.5, 1.0, -1.0, 0.0, 0.9, 0.1, 0.2])]
    picked = pick_samples(samples, top=2, random_count=2, seed=7)
    tags = [(tag, s.sample_id) for tag, s in picked]
    assert tags[:4] == [("top", "s1"), ("top", "s4"), ("bottom", "s2"), ("bottom", "s3")]
    assert [t for t, _ in tags[4:]] == ["random", "random"] and len({s for _, s in tags}) == 6
    assert pick_samples(samples, 2, 2, seed=7) == picked  # the same step picks the same ones
    assert len(pick_samples(samples[:3], top=2, random_count=5, seed=0)) == 3  # fewer samples than asked: each once


def test_rows_carry_text_beside_ids_and_print_readably():
    rows = sample_rows(3, [("top", _sample(9, 1.0))], _Tokenizer())
    assert rows[0]["response"] == "t3 t9" and rows[0]["response_ids"] == [3, 9] and rows[0]["step"] == 3
    text = format_samples(rows)
    assert "step 3 | top | reward +1.000 (correct +1.000)" in text and "    t3 t9" in text


def test_fewest_extremes_keeps_the_first_of_each_and_every_random_one():
    rows = [{"pick": p} for p in ("top", "top", "bottom", "bottom", "random", "random")]
    assert [r["pick"] for r in fewest_extremes(rows, 1)] == ["top", "bottom", "random", "random"]


class _Lines:
    def decode(self, ids):
        return "\n".join(f"t{i}" for i in ids)


def test_every_line_of_a_multi_line_text_is_indented_alike():
    text = format_samples(sample_rows(0, [("top", _sample(9, 1.0))], _Lines()))
    assert "  prompt:\n    t1\n    t2\n  response:\n    t3\n    t9" in text


def test_the_environments_tokens_are_marked_in_a_multi_turn_response():
    sample = _sample(9, 1.0)
    sample.response_ids, sample.loss_mask = [3, 4, 5, 6, 7], [1, 0, 0, 1, 1]
    [row] = sample_rows(0, [("top", sample)], _Tokenizer())
    assert [tuple(p) for p in row["response_parts"]] == [(True, "t3"), (False, "t4 t5"), (True, "t6 t7")]
    text = format_samples([row])
    assert "    t3\u27e6t4 t5\u27e7t6 t7" in text and "not trained on" in text
    # A single-turn response (no loss mask) prints as decoded, with no legend.
    assert "not trained on" not in format_samples(sample_rows(0, [("top", _sample(1, 0.0))], _Tokenizer()))
