"""PPO with a critic, without Ray: config errors, GAE wiring in the driver's step, the value model's
per-token reading, and the critic's batch tensors."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.algorithms import kl_penalty
from rlhf_cluster.config import AlgorithmConfig, ConfigError, FSDP2Backend, JobConfig, load_config
from rlhf_cluster.job.preflight import preflight
from rlhf_cluster.experience.build import build_group, critic_advantages
from rlhf_cluster.job.placement import resource_plan
from rlhf_cluster.experience.records import Rollout, ScoredSample, TrainBatch

PPO = {"algorithm": {"advantage": "gae"}, "critic": {"init": "policy"}, "generation": {"sampling": {"n": 1}}}


def _sample(i: int, n: int, reward: float) -> ScoredSample:
    return ScoredSample(
        sample_id=f"s{i}", prompt_id=f"p{i}", group_id=f"g{i}", prompt_ids=[1, 2], response_ids=list(range(10, 10 + n)),
        rollout_logprobs=[-1.0 - 0.1 * t for t in range(n)], policy_version=0, finish_reason="stop", reward=reward,
        reward_components={}, ref_logprobs=[-1.5] * n, advantages=[0.0] * n,
    )


# ---- config --------------------------------------------------------------------------------------
def test_gae_without_a_critic_section_names_both_fields():
    with pytest.raises(ValueError, match=r"algorithm.advantage=gae needs a learned critic.*`critic` section"):
        preflight(JobConfig.model_validate({"algorithm": {"advantage": "gae"}}))


def test_gae_with_a_critic_accepts_one_sample_per_prompt():
    cfg = JobConfig.model_validate(PPO)
    assert cfg.critic.world_size == 1 and cfg.algorithm.lam == 0.95
    assert [r.pool for r in resource_plan(cfg)].count("critic") == 1


def test_critic_world_size_must_divide_the_step_batch():
    with pytest.raises(ValueError, match=r"not divisible by critic.world_size=3"):
        preflight(JobConfig.model_validate({**PPO, "critic": {"world_size": 3}, "train": {"prompts_per_step": 4}}))


def test_critic_fields_are_typed_and_strict(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("algorithm: {advantage: gae}\ncritic: {value_clip: -1, learning_rate: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "critic.value_clip" in str(info.value) and "critic.learning_rate" in str(info.value)


def test_a_critic_with_another_advantage_is_a_warning_and_starts_no_critic():
    cfg = JobConfig.model_validate({"critic": {"init": "policy"}})
    assert any("only gae uses the critic" in w for w in preflight(cfg))
    assert "critic" not in [r.pool for r in resource_plan(cfg)]


def test_critic_settings_drive_the_shared_learner_machinery():
    cfg = JobConfig.model_validate({**PPO, "critic": {"lr": 5e-3, "max_grad_norm": 0.5, "world_size": 2, "seed": 7}})
    settings = cfg.critic.learner_settings()
    assert (settings.lr, settings.max_grad_norm, settings.world_size, settings.seed) == (5e-3, 0.5, 2, 7)
    assert isinstance(settings.backend, FSDP2Backend)


# ---- GAE in the step ----------------------------------------------------------------------------
def test_critic_advantages_returns_are_advantage_plus_value_with_reward_on_the_last_token():
    cfg = AlgorithmConfig(advantage="gae", gamma=1.0, lam=1.0, whiten_advantages=False, kl={"placement": "none", "coef": 0.0})
    samples = [_sample(0, 3, 1.0), _sample(1, 2, 0.0)]
    values = [[0.2, 0.5, 0.9], [0.1, -0.3]]
    returns, metrics = critic_advantages(samples, values, cfg, kl_coef=0.0)
    # gamma = lambda = 1 and no KL: every token's return is the sequence reward.
    assert returns == [pytest.approx([1.0, 1.0, 1.0], abs=1e-6), pytest.approx([0.0, 0.0], abs=1e-6)]
    assert samples[0].advantages == pytest.approx([0.8, 0.5, 0.1])
    assert samples[1].advantages == pytest.approx([-0.1, 0.3])
    assert metrics["return_mean"] == pytest.approx(3 / 5)


def test_critic_advantages_put_the_kl_penalty_on_each_token():
    cfg = AlgorithmConfig(advantage="gae", gamma=1.0, lam=1.0, kl={"placement": "reward", "coef": 0.5})
    s = _sample(0, 3, 1.0)
    k1 = kl_penalty(torch.tensor(s.rollout_logprobs), torch.tensor(s.ref_logprobs), "k1").tolist()
    assert all(abs(x) > 0.05 for x in k1)
    returns, _ = critic_advantages([s], [[0.0] * 3], cfg, kl_coef=0.5)
    # Return-to-go of -0.5 * k1_t per token, plus the reward at the end (returns are never whitened).
    assert returns[0] == pytest.approx([1.0 - 0.5 * sum(k1[t:]) for t in range(3)])


def test_whitened_gae_advantages_have_zero_mean_and_unit_std_over_the_batch():
    cfg = AlgorithmConfig(advantage="gae", kl={"placement": "none", "coef": 0.0})
    samples = [_sample(0, 3, 1.0), _sample(1, 2, 0.0), _sample(2, 4, 0.5)]
    critic_advantages(samples, [[0.1] * 3, [0.3] * 2, [-0.2] * 4], cfg, kl_coef=0.0)
    adv = torch.tensor([a for s in samples for a in s.advantages])
    assert abs(float(adv.mean())) < 1e-6 and abs(float(adv.std(correction=0)) - 1.0) < 1e-4


def test_critic_advantages_refuse_values_of_the_wrong_length():
    cfg = AlgorithmConfig(advantage="gae")
    with pytest.raises(ValueError, match="s0: 2 values for 3 response tokens"):
        critic_advantages([_sample(0, 3, 1.0)], [[0.0, 0.0]], cfg, kl_coef=0.0)


def test_build_group_leaves_the_kl_out_of_the_sequence_reward_for_gae():
    # GAE puts the KL on each token at take time; summing it into the reward too would count it twice.
    rollout = Rollout("r0", "p0", "g0", [1, 2], [10, 11], [-1.0, -2.0], 0, "stop")
    cfg = AlgorithmConfig(advantage="gae", kl={"placement": "reward", "coef": 0.5})
    samples, _ = build_group([rollout], [(1.0, {})], [[-1.5, -1.5]], cfg, kl_coef=0.5, max_new_tokens=8)
    assert samples[0].reward == 1.0 and "kl_penalty" not in samples[0].reward_components


def test_train_batch_pads_returns_and_old_values_and_checks_lengths():
    samples = [_sample(0, 3, 1.0), _sample(1, 1, 0.0)]
    batch = TrainBatch.from_samples(samples, returns=[[1.0, 2.0, 3.0], [4.0]], old_values=[[0.5] * 3, [0.25]])
    assert batch.returns.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    assert batch.old_values.tolist() == [[0.5, 0.5, 0.5], [0.25, 0.0, 0.0]]
    assert TrainBatch.from_samples(samples).returns is None
    with pytest.raises(ValueError, match="s1: returns has 2 values for 1 tokens"):
        TrainBatch.from_samples(samples, returns=[[1.0, 2.0, 3.0], [4.0, 5.0]], old_values=[[0.5] * 3, [0.25]])


# ---- the value model ----------------------------------------------------------------------------
def test_value_model_reads_token_t_before_it_is_chosen_and_ignores_padding(tiny_model_path):
    from rlhf_cluster.learner.critic import ValueModel
    from rlhf_cluster.experience.records import pad_sequences

    model = ValueModel.from_lm(tiny_model_path).eval()
    prompt, response = [5, 6, 7], [20, 21, 22, 23]
    changed = response[:2] + [99] + response[3:]  # a different token 2
    short = [8, 9]
    with torch.no_grad():
        ids, mask, plen, T = pad_sequences([prompt, prompt, short], [response, changed, [30]])
        values = model(ids, mask, plen, T)
        alone_ids, alone_mask, alone_plen, alone_T = pad_sequences([short], [[30]])
        alone = model(alone_ids, alone_mask, alone_plen, alone_T)
    assert values.shape == (3, 4)
    # V at token t sees the tokens before t only: changing token 2 changes values from token 3 on.
    assert torch.allclose(values[0, :3], values[1, :3], atol=1e-6)
    assert not torch.allclose(values[0, 3], values[1, 3], atol=1e-6)
    # The padded row's value equals the same sequence scored alone.
    assert torch.allclose(values[2, 0], alone[0, 0], atol=1e-5)


def _critic_batch():
    from tests.batches import ragged_batch

    batch = ragged_batch([(5, 3), (2, 9), (7, 1), (3, 6), (4, 4), (2, 1)], seed=3)  # the 3 tokens share a row
    generator = torch.Generator().manual_seed(0)
    batch.returns = torch.randn(batch.advantages.shape, generator=generator) * batch.response_mask
    batch.old_values = torch.zeros_like(batch.returns)
    return batch


def test_critic_values_and_step_packed_equal_padded_in_row_order(gloo_group, tiny_model_path):
    """The critic runs the policy learner's packed path: the same values, in the batch's row order
    when a token budget deals rows into micro-batches out of order, and the same value-loss step."""
    from rlhf_cluster.learner.critic import ValueLearner, critic_spec

    results = []
    for packing, budget in ((False, None), (True, None), (True, 14)):
        cfg = JobConfig.model_validate({**PPO, "critic": {"init": "policy", "world_size": 1, "lr": 1e-2, "seed": 5,
                                                          "sequence_packing": packing,
                                                          "max_tokens_per_micro_batch": budget}})
        critic = ValueLearner(*critic_spec(cfg), tiny_model_path)
        batch = _critic_batch()
        values = critic.values(batch)
        metrics = critic.train_step(batch)
        results.append((values * batch.response_mask, metrics))
    (padded, padded_metrics), *others = results
    for values, metrics in others:
        assert torch.allclose(values, padded, atol=1e-5), (values - padded).abs().max()
        assert metrics["critic/value_loss"] == pytest.approx(padded_metrics["critic/value_loss"], abs=1e-5)
