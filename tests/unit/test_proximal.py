"""π_prox filled pass by pass (one update) gives the step the same weights and diagnostics as the
no-grad forward before it; the global counts are each mini-batch's tokens and non-empty rows."""

import pytest
import torch

from rlhf_cluster.config import AlgorithmConfig
from rlhf_cluster.learner.objective import RLObjective
from rlhf_cluster.learner.proximal import ProximalPolicy, global_counts
from tests.process_groups import one_rank_process_group

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])


def _objective(enabled: bool = True, level: str = "token") -> RLObjective:
    cfg = AlgorithmConfig(advantage="grpo", correction={"enabled": enabled, "level": level})
    return RLObjective(cfg, max_tokens=4)


def _logprobs(seed: int) -> torch.Tensor:
    return -torch.rand(4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_filled_per_pass_equals_frozen(level):
    objective, rollout, current = _objective(level=level), _logprobs(0), _logprobs(1)
    frozen = ProximalPolicy(objective, rollout, MASK, current.clone())
    per_pass = ProximalPolicy(objective, rollout, MASK, None)
    for rows in (slice(0, 1), torch.tensor([1, 3]), slice(2, 3)):  # a range, then row indices
        prox_rows, weights = per_pass.rows_of(rows, current[rows].requires_grad_())
        assert not prox_rows.requires_grad
        want_prox, want_weights = frozen.rows_of(rows, current[rows])
        torch.testing.assert_close(prox_rows, want_prox)
        assert weights is not None and want_weights is not None
        torch.testing.assert_close(weights, want_weights)
    torch.testing.assert_close(per_pass.correction, frozen.correction)
    got, want = per_pass.correction_metrics(), frozen.correction_metrics()
    assert got.keys() == want.keys() and "correction/mismatch_k3" in got
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_no_weights_when_correction_is_off():
    policy = ProximalPolicy(_objective(enabled=False), _logprobs(0), MASK, None)
    prox_rows, weights = policy.rows_of(slice(0, 2), _logprobs(1)[:2])
    assert weights is None and policy.correction is None
    torch.testing.assert_close(prox_rows, _logprobs(1)[:2])
    assert "correction/mismatch_k1" in policy.correction_metrics()  # diagnostics all the same


def test_global_counts_per_mini_batch():
    with one_rank_process_group("gloo"):
        counts = global_counts(MASK, [0, 2, 4])
    assert counts.dtype == torch.float32
    assert counts.tolist() == [[5.0, 2.0], [4.0, 1.0]]  # mini-batch 2's empty row is no sequence
