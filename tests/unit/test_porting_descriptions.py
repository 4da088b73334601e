"""Field descriptions name the units and the peers' names where a port from veRL/TRL/slime would
go wrong (the field names stay; docs/algorithms.md, "Coming from veRL, TRL, OpenRLHF or slime")."""

from rlhf_cluster.config.algorithm import AlgorithmConfig, CorrectionConfig, KLConfig, LossConfig, ShapingConfig


def _text(model, field: str) -> str:
    return model.model_fields[field].description or ""


def test_kl_target_says_per_sequence_not_verl_per_token():
    text = _text(KLConfig, "target")
    assert "per SEQUENCE" in text and "target_kl" in text and "per-token" in text


def test_peer_names_sit_in_the_descriptions_that_differ_from_them():
    assert "low_var_kl" in _text(KLConfig, "estimator") and "clamps" in _text(KLConfig, "estimator")
    assert "use_kl_loss" in _text(KLConfig, "placement") and "use_kl_in_reward" in _text(KLConfig, "placement")
    assert "kl_loss_coef" in _text(KLConfig, "coef")
    assert "seq-mean-token-sum-norm" in _text(LossConfig, "aggregation")
    assert "norm_adv_by_std_in_grpo" in _text(AlgorithmConfig, "advantage")
    assert "truncate" in _text(CorrectionConfig, "lower") and "tis-clip-low" in _text(CorrectionConfig, "lower")
    assert "filter_groups" in _text(ShapingConfig, "dynamic_sampling")
    assert "filter_groups.metric" in _text(ShapingConfig, "dynamic_sampling_metric")
