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
from rlhf_cluster.learner.objective import RLObjective, checked_result, load_policy_loss

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
    ("metric_named_updated", "named 'updated'; expected a str other than loss, kl, kl_loss_term, entropy, updated"),
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


def _call(objective: RLObjective, rows: int):
    logprobs = torch.zeros(rows, 3, requires_grad=True)
    mask = torch.ones(rows, 3, dtype=torch.bool)
    return objective.loss(logprobs, logprobs.detach(), logprobs.detach(), torch.ones(rows, 3), mask, None, None,
                          kl_coef=0.0, denominator=3.0, token_denominator=3.0)


def test_metric_names_that_change_between_calls_fail_naming_the_field():
    """The step's metrics are all-reduced over the ranks by name: a name some micro-batches leave
    out would misalign the ranks (a hang), so each rank holds every call to its first call's names."""
    spec = f"{HERE}:names_by_rows"
    objective = RLObjective(AlgorithmConfig(loss={"function": spec}), max_tokens=3)
    _call(objective, 1)
    _call(objective, 1)  # the same names again
    with pytest.raises(ValueError) as info:
        _call(objective, 2)
    assert f"algorithm.loss.function='{spec}' returned metrics named ['rows'], its first call on this rank []" in str(
        info.value
    )
    assert "expected the same names on every call and rank" in str(info.value)
    # A fixed set of names passes call after call, whatever the batch.
    objective = RLObjective(AlgorithmConfig(loss={"function": f"{HERE}:reinforce"}), max_tokens=3)
    for rows in (1, 2, 1):
        assert set(_call(objective, rows)[1]) >= {"policy/calls", "policy/logprob_mean"}


def test_numpy_scalars_and_host_tensors_are_numbers():
    """numpy scalars are metrics (numpy-based user code); a 0-dim host tensor where the log-probs
    are on a device becomes a float on the host, so `StepMetrics` never copies it up synchronously."""
    metrics = _call(RLObjective(AlgorithmConfig(loss={"function": f"{HERE}:numpy_metrics"}), max_tokens=3), 2)[1]
    assert metrics["policy/share"] == 0.5 and metrics["policy/rows"] == 2.0
    assert all(type(metrics[k]) is float for k in ("policy/share", "policy/rows"))
    loss = torch.zeros((), requires_grad=True)
    device = torch.device("meta")  # any device other than the host
    _, out = checked_result("m:f", (loss, {"host": torch.tensor(2.5), "there": torch.zeros((), device=device)}),
                            True, device)
    assert out["host"] == 2.5 and type(out["host"]) is float
    assert isinstance(out["there"], torch.Tensor) and out["there"].device == device
    _, out = checked_result("m:f", (loss, {"host": torch.tensor(2.5)}), True, torch.device("cpu"))
    assert isinstance(out["host"], torch.Tensor)  # on the log-probs' own device: kept as it is


def test_step_metrics_take_numbers_as_device_scalars(gloo_group):
    """A user's numbers reach the step's reduction as numbers (a fill on the device, not a copy):
    token-weighted means, maxima by name."""
    from rlhf_cluster.learner.spec import Passes
    from rlhf_cluster.learner.step_metrics import StepMetrics

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    passes = Passes()
    passes.micro_metrics = [([0], {"policy/x": 1.0, "policy/x_max": 3.0}), ([1], {"policy/x": 4, "policy/x_max": 2.0})]
    passes.loss_tensors = [torch.zeros((), dtype=torch.float64)]
    reduction = StepMetrics(torch.device("cpu"), mask)
    out = reduction.read(reduction.device_values(passes, None, {}).tolist())
    assert out["policy/x"] == pytest.approx((1.0 * 2 + 4 * 1) / 3)
    assert out["policy/x_max"] == 3.0


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


def test_the_critics_ranks_do_not_import_the_users_loss(gloo_group, tiny_model_path):
    """The critic's ranks (`ValueLearner`, over the same learner base) compute no policy loss: a
    module only the policy's ranks can import does not fail the critic naming the policy's field."""
    from rlhf_cluster.learner.critic import ValueLearner, critic_spec

    cfg = JobConfig.model_validate({
        "algorithm": {"advantage": "gae", "loss": {"function": "nomod_h19_loss:fn"}},
        "critic": {"init": "policy", "world_size": 1, "seed": 5}, "generation": {"sampling": {"n": 1}},
    })
    critic = ValueLearner(*critic_spec(cfg), tiny_model_path)
    assert critic.objective.custom is None
    with pytest.raises(ValueError, match="module 'nomod_h19_loss' not found"):
        RLObjective(cfg.algorithm, max_tokens=3)  # the policy's ranks do import it
