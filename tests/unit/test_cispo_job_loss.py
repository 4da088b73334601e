"""CISPO as a job's loss (`algorithm.loss.mode: cispo`, `preset: cispo`): found comparing with veRL's
`loss_mode`, SkyRL's `policy_loss_type` and TRL's `loss_type`; `cispo_loss` was reachable only through
the Tinker API. The learner's objective runs it with the job's correction weights, aggregation and
global denominator; its gradient keeps the tokens PPO's clip silences."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.algorithms.losses import cispo_loss
from rlhf_cluster.config import AlgorithmConfig
from rlhf_cluster.learner.objective import RLObjective


def _grad(cfg: AlgorithmConfig, correction: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    old = torch.full((1, 4), -1.0, dtype=torch.float64)
    logprobs = (old + torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=torch.float64))).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = RLObjective(cfg, max_tokens=4).loss(
        logprobs, old, old, advantages, mask, correction, None, kl_coef=0.0, denominator=4, token_denominator=4
    )
    loss.backward()
    return logprobs.grad, metrics


def test_the_job_loss_keeps_every_tokens_gradient_under_cispo():
    ppo, _ = _grad(AlgorithmConfig(loss={"clip_low": 0.2, "clip_high": 0.2}, kl={"placement": "none"}))
    cispo, metrics = _grad(AlgorithmConfig(loss={"mode": "cispo", "clip_low": 0.2, "clip_high": 0.2},
                                           kl={"placement": "none"}))
    # PPO: a ratio past the band in the advantage's direction (1.5 with A > 0, 0.5 with A < 0) gives nothing.
    assert ppo[0, 0] == 0 and ppo[0, 2] == 0 and ppo[0, 1] != 0 and ppo[0, 3] != 0
    # CISPO: every token, weighted by its clamped ratio: -w A / 4 (token mean).
    torch.testing.assert_close(cispo, torch.tensor([[-1.2, 1.2, 0.8, -0.8]], dtype=torch.float64) / 4)
    assert metrics["policy/clip_frac"] == pytest.approx(1.0)


def test_cispo_takes_the_correction_weights_and_the_preset_is_one_sided():
    weights = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    cfg = AlgorithmConfig(preset="cispo")
    assert (cfg.loss.mode, 1 - cfg.loss.clip_low, 1 + cfg.loss.clip_high) == ("cispo", 0.0, 4.0)
    got, _ = _grad(cfg, weights)
    # [0, 4] clamps none of these ratios: -r A w / 4.
    torch.testing.assert_close(got, torch.tensor([[-3.0, 1.5, 0.5, 0.0]], dtype=torch.float64) / 4)
    value, _ = cispo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool),
                          correction=torch.tensor([[1.0, 3.0]]))
    assert value.item() == pytest.approx(0.0)  # its value holds logp (0 here): only the gradient means anything


@pytest.mark.parametrize("loss", [{"ratio_level": "sequence"}, {"clip_ratio_c": 3.0}])
def test_cispo_refuses_what_it_cannot_apply(loss):
    with pytest.raises(ValueError, match="algorithm.loss.mode: cispo clamps each token's weight"):
        AlgorithmConfig(loss={"mode": "cispo", **loss})
