"""REINFORCE++-baseline (`algorithm.advantage: reinforce_pp_baseline`; verl and slime
`reinforce_plus_plus_baseline`, OpenRLHF `reinforce_baseline`): found comparing with peers, which
all offer a group-mean baseline scaled over the whole batch. Each group's rewards less their mean
when scored, then whitened over the step's valid tokens when the batch is taken."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlhf_cluster.config import AlgorithmConfig, JobConfig
from rlhf_cluster.experience.build import build_group, finalize_batch
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.job.preflight import ConfigError, preflight


def _group(gid: str, rewards: list[float], lengths: list[int], cfg: AlgorithmConfig):
    rollouts = [Rollout(f"{gid}-{i}", gid, gid, [1, 2], list(range(n)), [-1.0] * n, 0, "stop")
                for i, n in enumerate(lengths)]
    samples, _ = build_group(rollouts, [(r, {}) for r in rewards], None, cfg, kl_coef=0.0, max_new_tokens=8)
    return samples


def test_group_means_then_one_scale_for_the_batch():
    cfg = AlgorithmConfig(advantage="reinforce_pp_baseline", kl={"placement": "none"})
    easy = _group("easy", [1.0, 1.0, 1.0, 0.0], [2, 3, 2, 4], cfg)  # nearly solved: GRPO's std would inflate it
    hard = _group("hard", [0.0, 0.0, 1.0, 0.0], [3, 3, 1, 2], cfg)
    assert [s.advantages[0] for s in easy] == pytest.approx([0.25, 0.25, 0.25, -0.75])  # the group's half
    batch, metrics = finalize_batch(easy + hard, cfg, kl_coef=0.0)
    tokens = torch.tensor([a for s in batch.samples for a in s.advantages], dtype=torch.float64)
    assert tokens.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert tokens.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    # One scale for the whole batch: every sample keeps its group advantage's sign and ratios.
    centred = metrics["advantage/batch_mean"]
    scale = metrics["advantage/batch_std"]
    for before, after in zip(easy + hard, batch.samples):
        assert after.advantages == pytest.approx([(a - centred) / (scale + 1e-8) for a in before.advantages])
    assert [s.advantages for s in easy] == [[0.25] * 2, [0.25] * 3, [0.25] * 2, [-0.75] * 4], "buffered copies changed"


def test_it_is_a_group_estimator_and_not_one_distillation_builds_on():
    cfg = JobConfig.model_validate({"algorithm": {"advantage": "reinforce_pp_baseline"},
                                    "generation": {"sampling": {"n": 1}}})
    with pytest.raises(ConfigError, match="reinforce_pp_baseline needs generation.sampling.n >= 2"):
        preflight(cfg, files=False)
    # Distillation adds the teacher's per-token advantages to the group's when scored; a batch whitening after
    # would rescale the teacher's term too.
    distilled = JobConfig.model_validate({"algorithm": {"advantage": "reinforce_pp_baseline", "kl": {"coef": 0.0},
                                                        "distillation": {"teacher": "/nowhere/teacher"}}})
    with pytest.raises(ConfigError, match="algorithm.advantage=reinforce_pp_baseline: the teacher's per-token"):
        preflight(distilled, files=False)


def test_samples_the_overlong_filter_drops_do_not_set_the_batch_scale():
    """Found in review: truncated responses (long, mostly poor) were in the whitening's mean and std."""
    cfg = AlgorithmConfig(advantage="reinforce_pp_baseline", kl={"placement": "none"}, shaping={"overlong_filter": True})
    group = _group("g", [1.0, 0.0, 0.0, 0.0], [2, 2, 2, 8], cfg)
    group[3] = dataclasses.replace(group[3], finish_reason="length")  # truncated: out of the loss
    batch, _ = finalize_batch(group, cfg, kl_coef=0.0)
    assert batch.in_loss == [True, True, True, False]
    kept = torch.tensor([a for s, on in zip(batch.samples, batch.in_loss) if on for a in s.advantages], dtype=torch.float64)
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert kept.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
