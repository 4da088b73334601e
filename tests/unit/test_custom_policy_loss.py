"""A user's policy loss by import path (`algorithm.loss.function`): found porting from slime
(`--custom-loss-function-path`) and veRL (`policy_loss.loss_mode` naming a loss registered with
`register_policy_loss`), where a job swaps in its own policy-gradient loss without a fork. The
learner imports it once per rank and calls it as the built-in losses are called, inside the same
objective (correction weights, global denominators, KL term, entropy bonus, `policy/` metrics);
the config refuses the built-in losses' own choices beside it, preflight imports it before Ray."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.config import AlgorithmConfig, ConfigError, JobConfig, load_config
from rlhf_cluster.learner.objective import RLObjective, load_policy_loss

HERE = "tests.unit.user_policy_losses"


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    logprobs = old + 0.4 * torch.randn(3, 5, generator=g, dtype=torch.float64)  # ratios inside and past the clip
    ref = old - 0.1
    advantages = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    correction = 0.5 + torch.rand(3, 5, generator=g, dtype=torch.float64)
    entropy = torch.rand(3, 5, generator=g, dtype=torch.float64)
    return logprobs, old, ref, advantages, mask, correction, entropy


def _loss(cfg: AlgorithmConfig, with_correction: bool = True):
    logprobs, old, ref, advantages, mask, correction, entropy = _batch()
    logprobs.requires_grad_()
    # Denominators as if another rank held more tokens and sequences than this one (global counts).
    objective = RLObjective(cfg, max_tokens=7)
    loss, metrics = objective.loss(
        logprobs, old, ref, advantages, mask, correction if with_correction else None, entropy.requires_grad_(),
        kl_coef=0.05, denominator=objective.denominator(torch.tensor(17.0), torch.tensor(5.0)),
        token_denominator=torch.tensor(17.0),
    )
    loss.backward()
    return loss.detach(), logprobs.grad, metrics


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "sequence_sum_norm"])
def test_a_function_that_calls_policy_loss_is_the_built_in_loss(aggregation):
    """Every argument arrives: the clip band, the aggregation, the correction weights, the global
    denominator and max_tokens all change this loss, and the user's door gives the built-in's."""
    loss = {"clip_low": 0.1, "clip_high": 0.3, "aggregation": aggregation}
    common = {"kl": {"placement": "loss", "estimator": "k2"}, "entropy_coef": 0.01}
    built_in = _loss(AlgorithmConfig(loss=loss, **common))
    custom = _loss(AlgorithmConfig(loss={**loss, "function": f"{HERE}:ppo_again"}, **common))
    torch.testing.assert_close(custom[0], built_in[0])
    torch.testing.assert_close(custom[1], built_in[1])
    assert custom[2].keys() == built_in[2].keys()
    for key in built_in[2]:
        torch.testing.assert_close(torch.as_tensor(custom[2][key]), torch.as_tensor(built_in[2][key]))
    assert {"policy/clip_frac", "policy/kl_loss_term", "policy/entropy"} <= custom[2].keys()


def test_reinforce_gives_its_own_loss_and_gradient_with_the_jobs_weights():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    cfg = AlgorithmConfig(loss={"function": f"{HERE}:reinforce"}, kl={"placement": "none"})
    loss, metrics = RLObjective(cfg, max_tokens=3).loss(
        logprobs, logprobs.detach(), logprobs.detach(), advantages, mask, torch.tensor([[2.0, 1.0, 1.0]]), None,
        kl_coef=0.0, denominator=4.0, token_denominator=4.0,
    )
    loss.backward()
    # -(w A logp) summed over the valid tokens / the global 4 tokens: -(2*1*-1 + 1*-1*-2) / 4 = 0.
    assert loss.item() == pytest.approx(0.0)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, 0.25, 0.0]], dtype=torch.float64))
    assert metrics["policy/logprob_mean"].item() == pytest.approx(-1.5)
    assert metrics["policy/calls"] == 1.0
    assert "policy/clip_frac" not in metrics  # PPO's metrics are PPO's; the user's are the user's


@pytest.mark.parametrize(("name", "message"), [
    ("per_token_loss", "returned a loss of a tensor of shape (1, 3); expected a 0-dim tensor"),
    ("loss_alone", "returned a tensor of shape (); expected a pair (loss, metrics)"),
    ("metrics_as_list", "returned metrics of list [1.0]; expected a dict"),
    ("vector_metric", "returned metric 'per_row' as a tensor of shape (1,); expected a 0-dim tensor or a number"),
    ("metric_named_kl", "returned a metric named 'kl'; expected a str other than loss, kl"),
    ("detached_loss", "returned a loss with no gradient to the log-probs"),
])
def test_a_bad_return_names_the_field_and_what_came_back(name, message):
    cfg = AlgorithmConfig(loss={"function": f"{HERE}:{name}"})
    logprobs = torch.zeros(1, 3, requires_grad=True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError) as info:
        RLObjective(cfg, max_tokens=3).loss(logprobs, logprobs.detach(), logprobs.detach(), torch.ones(1, 3), mask,
                                            None, None, kl_coef=0.0, denominator=3.0, token_denominator=3.0)
    assert f"algorithm.loss.function='{HERE}:{name}' " in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("loss", [
    {"mode": "cispo"}, {"ratio_level": "sequence"}, {"clip_ratio_c": 3.0},
])
def test_the_config_refuses_the_built_in_losses_choices_beside_a_function(loss):
    with pytest.raises(ValueError, match="algorithm.loss.function='m:f' replaces the built-in loss; "
                                         "algorithm.loss.mode, ratio_level and clip_ratio_c"):
        AlgorithmConfig(loss={"function": "m:f", **loss})


@pytest.mark.parametrize("preset", ["gspo", "cispo"])
def test_a_preset_that_chooses_a_built_in_loss_is_refused_with_a_function(preset):
    with pytest.raises(ValueError, match="presets gspo and cispo set them"):
        AlgorithmConfig(preset=preset, loss={"function": "m:f"})


def test_the_description_names_the_peers_fields_and_the_contract():
    from rlhf_cluster.config.algorithm import LossConfig

    text = LossConfig.model_fields["function"].description or ""
    for name in ("--custom-loss-function-path", "register_policy_loss", "policy_loss.loss_mode", "aggregate_loss",
                 "denominator, max_tokens) -> (0-dim loss tensor"):
        assert name in text, name


def test_the_config_refuses_a_function_that_is_no_import_path_and_keeps_the_default():
    with pytest.raises(ConfigError, match="algorithm.loss.function='reinforce' must look like 'module:function'"):
        load_config(None, ["algorithm.loss.function=reinforce"])
    assert JobConfig().algorithm.loss.function is None
    assert AlgorithmConfig(preset="dapo", loss={"function": "m:f"}).loss.function == "m:f"  # a token-level preset


@pytest.mark.parametrize(("spec", "message"), [
    ("nomod_h19_loss:fn", "algorithm.loss.function='nomod_h19_loss:fn': module 'nomod_h19_loss' not found"),
    (f"{HERE}:nope", f"module '{HERE}' has no attribute 'nope'"),
    (f"{HERE}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
    (f"{HERE}:too_few_arguments", "the learner calls it as fn(logprobs, old_logprobs, advantages, mask, *, clip_low"),
])
def test_preflight_imports_the_function_before_ray_starts(spec, message):
    cfg = load_config(None, [f"algorithm.loss.function={spec}"])  # valid field by field
    with pytest.raises(ValueError, match="algorithm.loss.function"):
        load_policy_loss(spec)
    from rlhf_cluster.job.preflight import preflight

    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert message in str(info.value)
    preflight(cfg, files=False)  # imported where the job runs (`submit` checks the config rules only)


def test_a_good_function_passes_preflight_and_the_dry_run(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from actors.commands.cli import app
    from rlhf_cluster.job.preflight import preflight

    assert preflight(load_config(None, [f"algorithm.loss.function={HERE}:reinforce"])) == []
    path = tmp_path / "job.yaml"
    cfg = load_config(None, ["algorithm.loss.function=nomod_h19_loss:fn", f"run_dir={tmp_path / 'run'}"])
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code != 0 and "algorithm.loss.function='nomod_h19_loss:fn'" in result.output, result.output


def test_a_real_learner_trains_with_the_users_loss(gloo_group, tiny_model_path):
    """A one-rank FSDP2 learner step: the user's function is the loss (its metric reaches the step's
    metrics under policy/) and the weights move."""
    from rlhf_cluster.learner.fsdp2 import FSDP2Learner
    from rlhf_cluster.learner.spec import LearnerSpec
    from tests.batches import ragged_batch

    cfg = JobConfig.model_validate({
        "learner": {"world_size": 1, "lr": 1e-3, "lr_warmup_steps": 0},
        "algorithm": {"loss": {"function": f"{HERE}:reinforce"}, "kl": {"placement": "none"}},
    })
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
    before = {name: t.clone() for name, t in learner.named_full_tensors()}
    metrics = learner.train_step(ragged_batch([(3, 2), (4, 3)], seed=0), kl_coef=0.0)
    after = dict(learner.named_full_tensors())
    assert metrics["policy/calls"] == pytest.approx(1.0)
    assert metrics["policy/logprob_mean"] < 0  # log-probs of the batch's tokens, token-weighted over the step
    assert "policy/clip_frac" not in metrics
    assert metrics["learner/skipped_updates"] == 0.0
    assert any(not torch.equal(before[name], after[name]) for name in before)
