"""Multi-turn samples: tokens an environment wrote (loss_mask 0) carry no weight in the policy
loss, the KL, the token rewards or the advantages. Checked against float64 references that only
ever see the model's tokens."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_cluster.algorithms import gae, kl_loss, policy_loss, reinforce_pp_advantages
from rlhf_cluster.config import AlgorithmConfig
from rlhf_cluster.experience.build import token_rewards
from rlhf_cluster.experience.records import ScoredSample, TrainBatch, samples_to_table, table_to_samples

MASK = [1, 1, 0, 0, 0, 1, 1, 0]  # model turn, tool output, model turn, tool output


def _sample(sid: str, mask, seed: int, reward: float = 1.0) -> ScoredSample:
    g = torch.Generator().manual_seed(seed)
    n = len(mask)
    rollout = (-torch.rand(n, generator=g, dtype=torch.float64) * 2).tolist()
    rollout = [lp if m else 0.0 for lp, m in zip(rollout, mask)]  # environment tokens have no rollout log-prob
    return ScoredSample(sample_id=sid, prompt_id="p", group_id="g", prompt_ids=[1, 2], response_ids=list(range(3, 3 + n)),
                        rollout_logprobs=rollout, policy_version=0, finish_reason="stop", reward=reward,
                        reward_components={}, ref_logprobs=(-torch.rand(n, generator=g, dtype=torch.float64)).tolist(),
                        advantages=torch.randn(n, generator=g, dtype=torch.float64).tolist(), loss_mask=list(mask))


def test_the_mask_survives_the_buffer_format_and_reaches_the_batch():
    s = _sample("s0", MASK, 0)
    back = table_to_samples(samples_to_table([s, _sample("s1", [1] * 8, 1)]))
    assert back[0].loss_mask == MASK and back[1].loss_mask == [1] * 8
    batch = TrainBatch.from_samples([s])
    assert batch.response_mask[0].tolist() == MASK
    assert TrainBatch.from_samples([s], in_loss=[False]).response_mask.sum() == 0
    with pytest.raises(ValueError, match="loss_mask must be 8 values"):
        _sample("bad", [1, 0], 0).__class__(**{**_sample("bad", MASK, 0).__dict__, "loss_mask": [1, 0]})


def test_policy_loss_and_kl_equal_a_float64_reference_over_model_tokens_only():
    samples = [_sample("a", MASK, 1), _sample("b", [1, 0, 1, 1, 0, 0, 0, 1], 2)]
    batch = TrainBatch.from_samples(samples)
    g = torch.Generator().manual_seed(9)
    logp = (batch.rollout_logprobs.double() + 0.3 * torch.randn(batch.rollout_logprobs.shape, generator=g, dtype=torch.float64))
    mask = batch.response_mask.double()
    old, adv, ref = batch.rollout_logprobs.double(), batch.advantages.double(), batch.ref_logprobs.double()
    loss, _ = policy_loss(logp, old, adv, mask, aggregation="token_mean")
    kl, _ = kl_loss(logp, ref, mask, "k3")
    pg_total = kl_total = 0.0
    count = 0
    # The batch holds float32 values: the reference reads those, from the samples' own token lists.
    for i, s in enumerate(samples):
        row_logp, row_old, row_adv, row_ref = logp[i].tolist(), old[i].tolist(), adv[i].tolist(), ref[i].tolist()
        for t, m in enumerate(s.model_tokens):
            if not m:
                continue
            r = math.exp(row_logp[t] - row_old[t])
            a = row_adv[t]
            pg_total += max(-a * r, -a * min(max(r, 0.8), 1.2))
            log_r = row_ref[t] - row_logp[t]
            kl_total += math.exp(log_r) - 1 - log_r
            count += 1
    assert loss.item() == pytest.approx(pg_total / count, rel=1e-12)
    assert kl.item() == pytest.approx(kl_total / count, rel=1e-12)
    # Whatever sits on the environment's tokens changes nothing and gets no gradient.
    noisy = logp.clone().requires_grad_(True)
    holes = mask == 0
    with torch.no_grad():
        noisy[holes] += 5.0
    total = policy_loss(noisy, old, adv, mask)[0] + kl_loss(noisy, ref, mask, "k3")[0]
    total.backward()
    assert total.item() == pytest.approx(loss.item() + kl.item(), rel=1e-12)
    assert torch.all(noisy.grad[holes] == 0)


def _compress(row: torch.Tensor, mask: list[int]) -> torch.Tensor:
    return row[[t for t, m in enumerate(mask) if m]]


def test_token_rewards_and_advantages_skip_the_environment_tokens():
    cfg = AlgorithmConfig.model_validate({"advantage": "gae", "kl": {"placement": "reward", "coef": 0.1}, "gamma": 0.99, "lam": 0.9})
    mask = [1, 1, 0, 0, 1, 1, 0, 0]  # ends with tool output: the sequence reward goes on the last model token (5)
    s = _sample("a", mask, 3, reward=2.0)
    rewards, token_mask = token_rewards([s], cfg, kl_coef=0.1)
    assert token_mask[0].tolist() == mask
    k1 = [s.rollout_logprobs[t] - s.ref_logprobs[t] for t in range(8)]
    expected = [(-0.1 * k1[t] if m else 0.0) + (2.0 if t == 5 else 0.0) for t, m in enumerate(mask)]
    assert rewards[0].double().tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # GAE over the holed row equals GAE over the model's tokens alone, computed in float64.
    values = torch.randn(1, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    adv, returns = gae(rewards.double(), values, token_mask.double(), gamma=0.99, lam=0.9)
    r, v = _compress(rewards[0].double(), mask), _compress(values[0], mask)
    ref_adv, next_v, next_a = [0.0] * len(r), 0.0, 0.0
    for t in reversed(range(len(r))):
        delta = float(r[t]) + 0.99 * next_v - float(v[t])
        next_a = delta + 0.99 * 0.9 * next_a
        ref_adv[t], next_v = next_a, float(v[t])
    assert _compress(adv[0], mask).tolist() == pytest.approx(ref_adv, rel=1e-12)
    assert adv[0][torch.tensor(mask) == 0].abs().sum() == 0 and returns[0][torch.tensor(mask) == 0].abs().sum() == 0
    # REINFORCE++ likewise: returns-to-go over model tokens only, zero elsewhere.
    rpp, _ = reinforce_pp_advantages(rewards.double(), token_mask.double(), gamma=1.0)
    assert rpp[0][torch.tensor(mask) == 0].abs().sum() == 0
    togo = torch.flip(torch.cumsum(torch.flip(r, [0]), 0), [0])
    whitened = (togo - togo.mean()) / (togo.std(unbiased=False) + 1e-8)
    assert _compress(rpp[0], mask).tolist() == pytest.approx(whitened.tolist(), rel=1e-9)
