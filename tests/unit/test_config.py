from pathlib import Path

import pytest

from rlhf_cluster.algorithms.presets import PRESETS
from rlhf_cluster.config import (ConfigError, DeepSpeedBackend, FunctionReward, JobConfig, LearnerConfig,
                                 RewardModelSpec, VerifierReward, load_config)
from rlhf_cluster.job.preflight import preflight
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _refusal(path: Path) -> str:
    """The message of the ConfigError `load_config(path)` raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_defaults_load():
    cfg = load_config()
    assert isinstance(cfg, JobConfig)
    assert cfg.train.total_steps == 20
    assert cfg.generation.sampling.n == 4
    assert cfg.algorithm.advantage == "grpo"
    assert cfg.metrics.bind_address == "127.0.0.1"
    assert cfg.samples_per_step == cfg.train.prompts_per_step * cfg.generation.sampling.n == 32
    assert cfg.weights_dir == Path("runs/demo") / "weights"


def test_demo_yaml_loads():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.name == "demo"
    assert cfg.learner.world_size == 2
    assert cfg.learner.lr == pytest.approx(3e-4)
    assert cfg.generation.sampling.max_new_tokens == 4
    assert (cfg.model.sft_warmup_steps, cfg.data.max_operand) == (100, 9)
    assert cfg.learner.backend.type == "fsdp2"
    assert cfg.algorithm.preset == "grpo" and cfg.algorithm.loss.aggregation == "sequence_mean"
    assert cfg.model.tiny.num_kv_heads == 1
    assert cfg.algorithm.correction.mode == "truncate"


def test_a_file_of_comments_only_is_refused_naming_it(tmp_path):
    path = _write(tmp_path, "# only a comment\n")
    msg = _refusal(path)
    assert str(path) in msg and "holds no settings" in msg


def test_unknown_key_names_dotted_path_and_file(tmp_path):
    path = _write(tmp_path, "train:\n  totl_steps: 5\n")
    msg = _refusal(path)
    assert "train.totl_steps" in msg
    assert str(path) in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(_write(tmp_path, "trian:\n  total_steps: 5\n"))


def test_wrong_type_names_field_and_value(tmp_path):
    path = _write(tmp_path, "train:\n  total_steps: many\n")
    msg = _refusal(path)
    assert "train.total_steps" in msg
    assert "many" in msg
    assert str(path) in msg


def test_every_bad_field_is_reported(tmp_path):
    path = _write(tmp_path, "train:\n  total_steps: 0\ngeneration:\n  sampling:\n    temperature: -1\n")
    msg = _refusal(path)
    assert "train.total_steps" in msg
    assert "generation.sampling.temperature" in msg


def test_bad_literal_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm\.kl\.estimator"):
        load_config(_write(tmp_path, "algorithm:\n  kl:\n    estimator: k9\n"))


@pytest.mark.parametrize(
    "text, why",
    [
        (None, "does not exist"),  # no file
        ("train: [unclosed\n  total_steps: 3\n", "YAML"),
        ("- a\n- b\n", "mapping"),  # a top level that is not a mapping
        ("just a string\n", "mapping"),
        ("42\n", "mapping"),
    ],
)
def test_an_unreadable_file_is_refused_by_name(tmp_path, text, why):
    path = tmp_path / "nope.yaml" if text is None else _write(tmp_path, text)
    msg = _refusal(path)
    assert str(path) in msg
    assert why in msg


@pytest.mark.parametrize("text", ["[]\n", "0\n", "false\n"])
def test_falsy_non_mapping_top_level_rejected(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, text))


def test_overrides_apply_with_yaml_typing(tmp_path):
    path = _write(tmp_path, "train:\n  total_steps: 20\n")
    cfg = load_config(
        path,
        [
            "train.total_steps=7",
            "algorithm.correction.enabled=false",
            "learner.lr=0.5",
            "model.path=null",
            "generation.resources.custom={gpu_node: 1}",
            "name=my-job",
        ],
    )
    assert cfg.train.total_steps == 7 and isinstance(cfg.train.total_steps, int)
    assert cfg.algorithm.correction.enabled is False
    assert cfg.learner.lr == 0.5
    assert cfg.model.path is None
    assert cfg.generation.resources.custom == {"gpu_node": 1.0}
    assert cfg.name == "my-job"


def test_override_creates_missing_sections():
    cfg = load_config(None, ["algorithm.kl.coef=0.25"])
    assert cfg.algorithm.kl.coef == 0.25
    # untouched siblings keep their defaults
    assert cfg.algorithm.kl.estimator == "k3"


def test_override_value_with_equals_sign():
    cfg = load_config(None, ["run_dir=/tmp/a=b"])
    assert cfg.run_dir == "/tmp/a=b"


def test_override_without_equals_is_error():
    with pytest.raises(ConfigError, match="train.total_steps"):
        load_config(None, ["train.total_steps"])


def test_override_into_scalar_is_error(tmp_path):
    with pytest.raises(ConfigError, match="not a section"):
        load_config(_write(tmp_path, "name: demo\n"), ["name.sub=1"])
    with pytest.raises(ConfigError, match="name"):
        load_config(None, ["name.sub=1"])


def test_override_unknown_key_named():
    with pytest.raises(ConfigError, match=r"train\.totl_steps"):
        load_config(None, ["train.totl_steps=3"])


def _checked(*overrides: str) -> list[str]:
    """Load with overrides and run preflight's rules (no files named here); its warnings."""
    return preflight(load_config(None, list(overrides)))


def test_buffer_capacity_boundary():
    # default: (max_staleness 1 + 1) * prompts_per_step 8 * n 4 = 64
    assert _checked("buffer.capacity=64") == []
    with pytest.raises(ConfigError) as info:
        _checked("buffer.capacity=63")
    assert "buffer.capacity" in str(info.value)


def test_buffer_capacity_depends_on_staleness():
    _checked("buffer.capacity=32", "train.max_staleness=0")
    with pytest.raises(ConfigError, match="buffer.capacity"):
        _checked("buffer.capacity=32", "train.max_staleness=1")


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo"])
def test_group_advantage_needs_n_at_least_2(advantage):
    with pytest.raises(ConfigError) as info:
        _checked(f"algorithm.advantage={advantage}", "generation.sampling.n=1")
    assert "generation.sampling.n" in str(info.value)
    _checked(f"algorithm.advantage={advantage}", "generation.sampling.n=2")


def test_tiny_head_dim_below_32_rejected():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.tiny.num_heads=4"])  # 64 / 4 = 16
    msg = str(info.value)
    assert "model.tiny" in msg
    assert "head_dim" in msg
    assert load_config(None, ["model.tiny.num_heads=4", "model.tiny.hidden_size=128"]).model.tiny.num_heads == 4


def test_tiny_heads_must_divide():
    with pytest.raises(ConfigError, match="model.tiny"):
        load_config(None, ["model.tiny.hidden_size=96", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=3"])


def test_data_needs_task_or_path():
    with pytest.raises(ConfigError, match=r"data\.task / data\.path"):
        _checked("data.task=null")
    cfg = load_config(None, ["data.task=null", "data.path=prompts.jsonl", "data.reward_fn=pkg.mod:fn"])
    assert cfg.data.path == "prompts.jsonl"
    preflight(cfg, files=False)


def test_validate_assignment():
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.train.total_steps = 0


def test_algorithm_preset_fills_fields_and_explicit_fields_win(tmp_path):
    path = _write(tmp_path, "algorithm:\n  preset: dapo\n  loss:\n    clip_high: 0.3\n")
    cfg = load_config(path)
    assert cfg.algorithm.loss.clip_high == 0.3  # explicit beats preset
    assert cfg.algorithm.loss.aggregation == "token_mean"  # preset sibling kept
    assert cfg.algorithm.kl.placement == "none"
    assert cfg.algorithm.shaping.dynamic_sampling is True
    plain = load_config()
    assert plain.algorithm.shaping.dynamic_sampling is False


def test_overlong_buffer_must_fit_max_new_tokens():
    with pytest.raises(ConfigError, match=r"algorithm\.shaping\.overlong_buffer"):
        _checked("algorithm.shaping.overlong_buffer=16", "generation.sampling.max_new_tokens=16")
    _checked("algorithm.shaping.overlong_buffer=15", "generation.sampling.max_new_tokens=16")


def test_int8_rollouts_keep_correction_on_by_default_and_warn_when_it_is_off():
    cfg = load_config(None, ["generation.quantization=int8"])
    assert cfg.algorithm.correction.enabled and cfg.algorithm.correction.mode == "truncate"
    assert cfg.algorithm.correction.level == "token" and cfg.algorithm.correction.cap == 2.0
    assert preflight(cfg) == []
    [warning] = _checked("generation.quantization=int8", "algorithm.correction.enabled=false")
    assert "generation.quantization=int8" in warning and "algorithm.correction.enabled=false" in warning
    assert _checked("algorithm.correction.enabled=false") == []


def test_unknown_quantization_names_the_field():
    with pytest.raises(ConfigError, match=r"generation.quantization: .*'none' or 'int8'.*\(got 'fp8'\)"):
        load_config(None, ["generation.quantization=fp8"])


def test_streaming_settings_validate_and_warn():
    cfg = load_config(None, ["generation.max_num_seqs=64", "train.oversample_groups=2", "train.max_staleness=1"])
    assert cfg.generation.mode == "streaming" and cfg.generation.in_flight_update == "resume"
    assert cfg.generation.max_num_seqs == 64 and preflight(cfg) == []
    [warning] = _checked("train.oversample_groups=2", "train.max_staleness=0")
    assert "oversample_groups" in warning and "stale" in warning
    [warning] = _checked("generation.mode=batched", "generation.in_flight_update=abort")
    assert "in_flight_update" in warning
    # Over-sampled groups must fit in the buffer beside the staleness allowance.
    with pytest.raises(ConfigError, match="oversample_groups"):
        _checked("buffer.capacity=64", "train.prompts_per_step=8", "generation.sampling.n=4",
                 "train.max_staleness=0", "train.oversample_groups=9")
    with pytest.raises(ConfigError, match="generation.mode"):
        load_config(None, ["generation.mode=sometimes"])


def test_lora_needs_fsdp2_and_a_kl_outside_the_reward():
    cfg = load_config(None, ["learner.lora.rank=8"])
    assert cfg.learner.lora.enabled and cfg.learner.lora.alpha == 16.0
    assert not load_config(None, []).learner.lora.enabled
    with pytest.raises(ConfigError, match=r"learner\.lora needs learner\.backend: fsdp2"):
        _checked("learner.lora.rank=8", "learner.backend=deepspeed")
    with pytest.raises(ConfigError, match=r"kl\.placement=reward"):
        _checked("learner.lora.rank=8", "algorithm.kl.placement=reward")
    with pytest.raises(ConfigError, match=r"learner\.lora\.rank"):
        load_config(None, ["learner.lora.rank=-1"])


# ---- seeds -------------------------------------------------------------------------------------
SEEDED = ["data", "generation", "learner", "critic", "sft", "reward_model"]
WITH_EVERY_SECTION = {"critic": {}, "sft": {}, "reward_model": {}}


def _seeds(cfg: JobConfig) -> dict[str, int]:
    return {name: getattr(cfg, name).seed for name in SEEDED}


def test_every_component_seed_is_derived_from_the_job_seed():
    base = JobConfig.model_validate(WITH_EVERY_SECTION)
    other = JobConfig.model_validate({**WITH_EVERY_SECTION, "seed": 7})
    assert all(isinstance(v, int) for v in _seeds(base).values()), _seeds(base)
    changed = [name for name in SEEDED if _seeds(base)[name] != _seeds(other)[name]]
    assert changed == SEEDED, "every component seed follows the job's seed"
    # The tiny model stands in for a pretrained checkpoint: the job's seed leaves it alone.
    assert base.model.tiny.seed == other.model.tiny.seed == 0


def test_an_explicit_component_seed_wins():
    cfg = load_config(None, ["seed=7", "learner.seed=3", "data.seed=0", "critic={}", "sft={}", "reward_model={}"])
    assert (cfg.learner.seed, cfg.data.seed, cfg.generation.seed) == (3, 0, 7)
    # A resolved config dumps explicit seeds, so a worker rebuilding it gets the same ones.
    assert _seeds(JobConfig.model_validate(cfg.model_dump())) == _seeds(cfg)


def test_a_section_passed_as_an_object_is_not_changed():
    from rlhf_cluster.config import DataConfig

    data = DataConfig()
    cfg = JobConfig(seed=5, data=data)
    assert cfg.data.seed == 5 and data.seed is None


# ---- renamed fields ----------------------------------------------------------------------------
@pytest.mark.parametrize(("old", "new"), [
    ("model.warmup_steps", "model.sft_warmup_steps"),
    ("model.warmup_lr", "model.sft_warmup_lr"),
    ("model.warmup_batch_size", "model.sft_warmup_batch_size"),
    ("learner.warmup_steps", "learner.lr_warmup_steps"),
    ("critic.warmup_steps", "critic.lr_warmup_steps"),
])
def test_renamed_fields_are_refused_with_their_new_name(old, new):
    with pytest.raises(ConfigError, match=rf"{old} was renamed to {new}"):
        load_config(None, [f"{old}=2"])
    assert load_config(None, [f"{new}=2"])


def test_the_two_warmups_are_separate_fields():
    cfg = load_config(None, ["model.sft_warmup_steps=100", "learner.lr_warmup_steps=5", "critic.lr_warmup_steps=2"])
    assert (cfg.model.sft_warmup_steps, cfg.learner.lr_warmup_steps, cfg.critic.lr_warmup_steps) == (100, 5, 2)
    assert cfg.critic.learner_settings().lr_warmup_steps == 2


# ---- typed pluggable parts ---------------------------------------------------------------------
def test_learner_backend_is_typed_and_a_bare_name_is_short_for_its_type():
    typed = load_config(None, ["learner.backend={type: deepspeed, zero_stage: 2}"])
    assert typed.learner.backend.type == "deepspeed" and typed.learner.backend.zero_stage == 2
    assert load_config(None, ["learner.backend=deepspeed"]).learner.backend.zero_stage == 3
    # Code asks a part's kind by its class: a part never equals its type's name.
    assert isinstance(typed.learner.backend, DeepSpeedBackend) and typed.learner.backend != "deepspeed"
    with pytest.raises(ConfigError, match=r"learner\.backend\.zero_stage.*[Ee]xtra"):
        load_config(None, ["learner.backend={type: fsdp2, zero_stage: 2}"])


def test_override_into_a_backend_given_by_name(tmp_path):
    cfg = load_config(_write(tmp_path, "learner:\n  backend: deepspeed\n"), ["learner.backend.offload_optimizer=true"])
    assert cfg.learner.backend.type == "deepspeed" and cfg.learner.backend.offload_optimizer


def test_old_deepspeed_section_still_loads_and_options_without_the_backend_are_refused():
    cfg = load_config(None, ["learner.backend=deepspeed", "learner.deepspeed={zero_stage: 1}"])
    assert cfg.learner.backend.type == "deepspeed" and cfg.learner.backend.zero_stage == 1
    with pytest.raises(ConfigError, match=r"learner\.deepspeed.*learner\.backend is not deepspeed"):
        load_config(None, ["learner.deepspeed={zero_stage: 1}"])


def test_weight_transport_is_typed():
    default = load_config().weights
    assert default.transport.type == "direct" and default.transport.bucket_mb == 64 and default.persist_every == 10
    assert load_config(None, ["weights.transport=filesystem"]).weights.transport.type == "filesystem"
    assert load_config(None, ["weights.transport={type: direct, bucket_mb: 8}"]).weights.transport.bucket_mb == 8
    with pytest.raises(ConfigError, match=r"weights\.transport.*'filesystem'.*'direct'"):
        load_config(None, ["weights.transport=carrier_pigeon"])
    with pytest.raises(ConfigError, match=r"weights\.transport\.bucket_mb"):
        load_config(None, ["weights.transport={type: direct, bucket_mb: 0}"])
    with pytest.raises(ConfigError, match=r"weights\.transport\.bucket_mb"):
        load_config(None, ["weights.transport={type: filesystem, bucket_mb: 8}"])  # not a field of that kind


# ---- reward sources ----------------------------------------------------------------------------
def test_default_reward_is_the_task_verifier():
    s = load_config().scoring
    assert [r.type for r in s.rewards] == ["verifier"]
    assert (s.rule_source, s.model_source) == (VerifierReward(weight=1.0), None)


def test_reward_sources_in_the_new_spelling():
    s = load_config(None, ["scoring.rewards=[{type: function, function: 'pkg.mod:fn', weight: 0.5}, "
                           "{type: model, models: [{path: a, name: a}, {path: b, name: b}], combine: min, weight: 2}]"]).scoring
    rule, model = s.rule_source, s.model_source
    assert isinstance(rule, FunctionReward) and (rule.function, rule.weight) == ("pkg.mod:fn", 0.5)
    assert model is not None and [m.path for m in model.models] == ["a", "b"]
    assert (model.weight, model.combine) == (2.0, "min")


def test_old_reward_spellings_load_as_sources():
    cfg = load_config(None, ["data.reward_fn=pkg.mod:fn", "scoring.reward_models=[{path: rm}]", "scoring.rule_weight=0",
                             "scoring.reward_model_combine=min"])
    assert [r.type for r in cfg.scoring.rewards] == ["function", "model"]
    rule, model = cfg.scoring.rule_source, cfg.scoring.model_source
    assert isinstance(rule, FunctionReward) and model is not None
    assert (rule.function, rule.weight, model.combine) == ("pkg.mod:fn", 0.0, "min")
    with pytest.raises(ConfigError, match="cannot be combined"):
        load_config(None, ["data.reward_fn=pkg.mod:fn", "scoring.rewards=[verifier]"])


def test_reward_source_rules():
    with pytest.raises(ConfigError, match=r"scoring\.rewards: .*at most one rule source"):
        load_config(None, ["scoring.rewards=[verifier, {type: function, function: 'a:b'}]"])
    with pytest.raises(ConfigError, match=r"scoring\.rewards: .*at most one `model` source"):
        load_config(None, ["scoring.rewards=[model, model]"])
    with pytest.raises(ConfigError, match=r"scoring\.rewards\[0\]\.function: .*module:function"):
        load_config(None, ["scoring.rewards=[{type: function, function: nocolon}]"])
    with pytest.raises(ConfigError, match=r"scoring\.rewards\[0\]: .*needs a `type`: one of verifier, function, model"):
        load_config(None, ["scoring.rewards=[{weight: 1}]"])
    with pytest.raises(ConfigError, match=r"scoring\.rewards"):
        load_config(None, ["scoring.rewards=[]"])


def test_with_reward_models_fills_the_model_source(tmp_path):
    cfg = load_config(REPO / "configs" / "three_stage.yaml")
    assert cfg.scoring.rule_source is not None and cfg.scoring.rule_source.weight == 0.0
    assert cfg.scoring.model_source is not None and cfg.scoring.model_source.models == []  # none yet
    scoring = cfg.scoring.with_reward_models([RewardModelSpec(path="rm")])
    assert [r.type for r in scoring.rewards] == ["verifier", "model"]
    assert scoring.model_source is not None and scoring.model_source.weight == 1.0
    assert [m.path for m in scoring.model_source.models] == ["rm"]
    assert cfg.scoring.model_source.models == []  # a copy: the job's config is not changed
    weighted = load_config(None, ["scoring.rewards=[verifier, {type: model, weight: 2, combine: min}]"]).scoring
    kept = weighted.with_reward_models([RewardModelSpec(path="rm")]).model_source
    assert kept is not None and (kept.weight, kept.combine, len(kept.models)) == (2.0, "min", 1)


# ---- presets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_loads_and_passes_preflight(name):
    cfg = load_config(None, [f"algorithm.preset={name}"])
    assert cfg.algorithm.preset == name
    assert cfg.algorithm.advantage == PRESETS[name]["advantage"]
    preflight(cfg)


def test_preset_names_are_the_registry():
    from typing import get_args

    from rlhf_cluster.config import AlgorithmConfig

    literal = AlgorithmConfig.model_fields["preset"].annotation
    assert {a for arg in get_args(literal) for a in get_args(arg)} == set(PRESETS)


def test_learner_cpu_threads_share_the_node_among_ranks():
    # Unset: the node's cores split among the ranks (at least one each), one for a small model;
    # reserved whole cores win over that; an explicit count wins over both.
    big, small = 600 << 20, 1 << 20
    assert LearnerConfig().cpu_threads_per_rank(2, big) == 2
    assert LearnerConfig().cpu_threads_per_rank(2, small) == 1
    assert LearnerConfig(world_size=2).cpu_threads_per_rank(2, big) == 1
    assert LearnerConfig(world_size=4).cpu_threads_per_rank(2, big) == 1
    assert LearnerConfig(world_size=2, resources={"num_cpus": 3}).cpu_threads_per_rank(16, small) == 3
    assert LearnerConfig(world_size=2, resources={"num_cpus": 0.5}).cpu_threads_per_rank(16, big) == 8
    assert LearnerConfig(cpu_threads=5, resources={"num_cpus": 3}).cpu_threads_per_rank(16, small) == 5


@pytest.mark.parametrize("sections, named", [
    ({"algorithm": {"kl": {"coef": 0.05}}}, "algorithm.kl"),
    ({"algorithm": {"kl": {"coef": 0.0, "controller": "adaptive"}}}, "algorithm.kl"),
    ({"algorithm": {"kl": {"placement": "none"}}, "guardrails": {"rollback": {"kl_above": 1.0}}},
     "guardrails.rollback.kl_above"),
])
def test_kl_without_a_reference_model_is_refused(sections, named):
    # Without reference log-probs the KL would be taken to the rollout policy, silently.
    with pytest.raises(ValidationError, match=rf"scoring.reference is false.*{named}"):
        JobConfig.model_validate({"scoring": {"reference": False}, **sections})


def test_no_reference_model_is_fine_when_nothing_needs_one():
    for kl in ({"coef": 0.0}, {"placement": "none", "coef": 0.1}):
        assert not JobConfig.model_validate({"scoring": {"reference": False}, "algorithm": {"kl": kl}}).scoring.reference
    lora = JobConfig.model_validate({"scoring": {"reference": False}, "learner": {"lora": {"rank": 4}}})
    assert lora.algorithm.kl.coef > 0  # the learner's base model is the reference
