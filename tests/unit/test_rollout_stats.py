"""The rollout statistics against values worked out by hand."""

import pytest

from rlhf_cluster.telemetry.rollout_stats import (distinct_n, mean_pass_at_k, model_turns, pass_at_k, percentile, rollout_stats,
                                        unique_per_group)
from rlhf_cluster.experience.records import ScoredSample


def test_distinct_n_by_hand():
    # [1 2 3 1 2] has bigrams 12 23 31 12 (3 distinct of 4); [1 2] adds 12 (still 3 of 5).
    responses = [[1, 2, 3, 1, 2], [1, 2]]
    assert distinct_n(responses, 1) == 3 / 7
    assert distinct_n(responses, 2) == 3 / 5
    assert distinct_n(responses, 3) == 3 / 3  # 123 231 312
    assert distinct_n([[5]], 2) == 0.0  # no bigram at all


def test_unique_per_group_by_hand():
    collapsed = [[7, 7], [7, 7], [7, 7], [7, 7]]  # one answer 4 times: 1/4
    varied = [[1], [2], [1], [3]]                 # 3 distinct of 4
    assert unique_per_group([collapsed, varied]) == (0.25 + 0.75) / 2


def test_percentiles_interpolate_like_numpy():
    values = [1, 2, 3, 4, 10]
    assert percentile(values, 50) == 3
    assert percentile(values, 90) == pytest.approx(4 + 0.6 * 6)  # position 3.6 between 4 and 10
    assert percentile([7], 90) == 7


def _sample(i, group, response, reward, finish="stop"):
    return ScoredSample(sample_id=f"s{i}", prompt_id="p", group_id=group, prompt_ids=[1], response_ids=response,
                        rollout_logprobs=[0.0] * len(response), policy_version=0, finish_reason=finish, reward=reward,
                        reward_components={}, ref_logprobs=[0.0] * len(response), advantages=[0.0] * len(response))


def test_a_steps_rollout_stats():
    samples = [_sample(0, "g0", [1, 2], 1.0), _sample(1, "g0", [1, 2], 0.0, "length"),
               _sample(2, "g1", [3, 4, 5, 6], 0.5), _sample(3, "g1", [3], -1.0)]
    stats = rollout_stats(samples)
    assert stats["response_len_max"] == 4 and stats["response_len_p50"] == 2
    assert stats["truncated_fraction"] == 0.25
    assert (stats["reward_min"], stats["reward_max"]) == (-1.0, 1.0)
    assert stats["unique_per_group"] == (0.5 + 1.0) / 2
    assert stats["distinct_1"] == 6 / 9
    assert "episode_turns_mean" not in stats  # single-turn samples


def test_model_turns_of_episodes_by_hand():
    assert model_turns([1, 1, 0, 0, 1]) == 2        # call, observation, answer
    assert model_turns([1, 1, 1]) == 1              # answered at once
    assert model_turns([0, 1, 0, 1, 0, 1]) == 3     # the environment spoke first
    assert model_turns([]) == 0
    episodes = [_sample(0, "g0", [1, 2, 3, 4, 5], 1.0), _sample(1, "g0", [1, 2], 0.0)]
    episodes[0].loss_mask, episodes[1].loss_mask = [1, 1, 0, 0, 1], [1, 1]
    assert rollout_stats(episodes)["episode_turns_mean"] == (2 + 1) / 2


def test_every_labelled_gauge_column_is_in_a_step_row():
    from rlhf_cluster.telemetry import metrics as m
    from rlhf_cluster.telemetry.step_report import step_row

    samples = [_sample(0, "g0", [1, 2], 1.0), _sample(1, "g0", [2, 2], 0.0)]
    # The driver's counters bring the pipeline's columns (busy shares, queues, periodic evaluation).
    driver = {c: 0.5 for c in m.STEP_LABELLED_GAUGES if c.startswith(("busy_", "queue_", "eval_"))}
    row = step_row(0, samples, {"policy/kl": 0.0, "learner/step_seconds": 0.1}, 0.2, driver)
    missing = [c for c in [*m.STEP_LABELLED_GAUGES, "truncated_fraction", "unique_per_group"] if c not in row]
    assert not missing, missing


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0), (4, 4, 2, 1.0), (4, 1, 1, 0.25),
    (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (8, 2, 4, 1 - 15 / 70),  # 1 - C(6,4)/C(8,4)
    (5, 3, 3, 1.0),  # fewer wrong answers than k: some right one is always drawn
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_matches_brute_force_over_subsets_and_averages_per_prompt():
    import itertools

    answers = [True, False, False, True, False, False]
    subsets = list(itertools.combinations(answers, 3))
    assert pass_at_k(6, 2, 3) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), rel=1e-12)
    assert mean_pass_at_k({"a": [True, False], "b": [False, False]}, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
