from pathlib import Path

import pytest

from rlhf_cluster.config import ConfigError, JobConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


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
    assert (cfg.model.warmup_steps, cfg.data.max_operand) == (100, 9)
    assert cfg.algorithm.preset == "grpo" and cfg.algorithm.loss.aggregation == "sequence_mean"
    assert cfg.model.tiny.num_kv_heads == 1
    assert cfg.algorithm.correction.mode == "truncate"


def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "# only a comment\n"))
    assert cfg == load_config()


def test_unknown_key_names_dotted_path_and_file(tmp_path):
    path = _write(tmp_path, "train:\n  totl_steps: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "train.totl_steps" in msg
    assert str(path) in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(_write(tmp_path, "trian:\n  total_steps: 5\n"))


def test_wrong_type_names_field_and_value(tmp_path):
    path = _write(tmp_path, "train:\n  total_steps: many\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "train.total_steps" in msg
    assert "many" in msg
    assert str(path) in msg


def test_every_bad_field_is_reported(tmp_path):
    path = _write(tmp_path, "train:\n  total_steps: 0\ngeneration:\n  sampling:\n    temperature: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "train.total_steps" in msg
    assert "generation.sampling.temperature" in msg


def test_bad_literal_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm\.kl\.estimator"):
        load_config(_write(tmp_path, "algorithm:\n  kl:\n    estimator: k9\n"))


def test_missing_file_names_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_invalid_yaml_names_file(tmp_path):
    path = _write(tmp_path, "train: [unclosed\n  total_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "YAML" in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level_names_file(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "mapping" in str(info.value)


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


def test_buffer_capacity_boundary():
    # default: (max_staleness 1 + 1) * prompts_per_step 8 * n 4 = 64
    assert load_config(None, ["buffer.capacity=64"]).buffer.capacity == 64
    with pytest.raises(ConfigError) as info:
        load_config(None, ["buffer.capacity=63"])
    assert "buffer.capacity" in str(info.value)


def test_buffer_capacity_depends_on_staleness():
    load_config(None, ["buffer.capacity=32", "train.max_staleness=0"])
    with pytest.raises(ConfigError, match="buffer.capacity"):
        load_config(None, ["buffer.capacity=32", "train.max_staleness=1"])


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo"])
def test_group_advantage_needs_n_at_least_2(advantage):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"algorithm.advantage={advantage}", "generation.sampling.n=1"])
    assert "generation.sampling.n" in str(info.value)
    assert load_config(None, [f"algorithm.advantage={advantage}", "generation.sampling.n=2"])


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
    with pytest.raises(ConfigError, match="data"):
        load_config(None, ["data.task=null"])
    cfg = load_config(None, ["data.task=null", "data.path=prompts.jsonl"])
    assert cfg.data.path == "prompts.jsonl"


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
        load_config(None, ["algorithm.shaping.overlong_buffer=16", "generation.sampling.max_new_tokens=16"])
    load_config(None, ["algorithm.shaping.overlong_buffer=15", "generation.sampling.max_new_tokens=16"])


def test_int8_rollouts_keep_correction_on_by_default_and_warn_when_it_is_off():
    cfg = load_config(None, ["generation.quantization=int8"])
    assert cfg.algorithm.correction.enabled and cfg.algorithm.correction.mode == "truncate"
    assert cfg.algorithm.correction.level == "token" and cfg.algorithm.correction.cap == 2.0
    assert cfg.warnings() == []
    off = load_config(None, ["generation.quantization=int8", "algorithm.correction.enabled=false"])
    [warning] = off.warnings()
    assert "generation.quantization=int8" in warning and "algorithm.correction.enabled=false" in warning
    assert load_config(None, ["algorithm.correction.enabled=false"]).warnings() == []


def test_unknown_quantization_names_the_field():
    with pytest.raises(ConfigError, match=r"generation.quantization: .*'none' or 'int8'.*\(got 'fp8'\)"):
        load_config(None, ["generation.quantization=fp8"])


def test_streaming_settings_validate_and_warn():
    cfg = load_config(None, ["generation.max_num_seqs=64", "train.oversample_groups=2", "train.max_staleness=1"])
    assert cfg.generation.mode == "streaming" and cfg.generation.in_flight_update == "resume"
    assert cfg.generation.max_num_seqs == 64 and cfg.warnings() == []
    [warning] = load_config(None, ["train.oversample_groups=2", "train.max_staleness=0"]).warnings()
    assert "oversample_groups" in warning and "stale" in warning
    [warning] = load_config(None, ["generation.mode=batched", "generation.in_flight_update=abort"]).warnings()
    assert "in_flight_update" in warning
    # Over-sampled groups must fit in the buffer beside the staleness allowance.
    with pytest.raises(ConfigError, match="oversample_groups"):
        load_config(None, ["buffer.capacity=64", "train.prompts_per_step=8", "generation.sampling.n=4",
                           "train.max_staleness=0", "train.oversample_groups=9"])
    with pytest.raises(ConfigError, match="generation.mode"):
        load_config(None, ["generation.mode=sometimes"])


def test_lora_needs_fsdp2_and_a_kl_outside_the_reward():
    cfg = load_config(None, ["learner.lora.rank=8"])
    assert cfg.learner.lora.enabled and cfg.learner.lora.alpha == 16.0
    assert not load_config(None, []).learner.lora.enabled
    with pytest.raises(ConfigError, match=r"learner\.lora needs learner\.backend: fsdp2"):
        load_config(None, ["learner.lora.rank=8", "learner.backend=deepspeed"])
    with pytest.raises(ConfigError, match=r"kl\.placement=reward"):
        load_config(None, ["learner.lora.rank=8", "algorithm.kl.placement=reward"])
    with pytest.raises(ConfigError, match=r"learner\.lora\.rank"):
        load_config(None, ["learner.lora.rank=-1"])
