"""learner.backend: {type: deepspeed} — the typed options and preflight's checks of the user's DeepSpeed JSON.

No deepspeed import here: the config is built and checked without it.
"""

from __future__ import annotations

import json

import pytest

from rlhf_cluster.config import ConfigError, JobConfig, load_config
from rlhf_cluster.learner.deepspeed_config import engine_config
from rlhf_cluster.job.preflight import preflight


def _write_yaml(tmp_path, learner: dict) -> str:
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"learner": learner}))
    return str(path)


def _ds_json(tmp_path, content, name="ds.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _load(tmp_path, ds_json: dict | str, **learner) -> JobConfig:
    """The job config with `ds_json` as the user's DeepSpeed JSON, after preflight (which checks it)."""
    config_file = _ds_json(tmp_path, ds_json)
    backend = {"type": "deepspeed", "config_file": config_file, **learner.pop("backend", {})}
    cfg = load_config(_write_yaml(tmp_path, {"backend": backend, **learner}))
    preflight(cfg)
    return cfg


def test_defaults_are_fsdp2_and_zero3():
    assert JobConfig().learner.backend.type == "fsdp2"
    ds = JobConfig.model_validate({"learner": {"backend": "deepspeed"}}).learner.backend
    assert ds.type == "deepspeed" and ds.zero_stage == 3
    assert not ds.offload_optimizer and not ds.offload_params and ds.config_file is None


def test_engine_config_from_learner_settings():
    cfg = JobConfig.model_validate(
        {"learner": {"backend": {"type": "deepspeed", "zero_stage": 2, "offload_optimizer": True}, "world_size": 2,
                     "lr": 3e-4, "weight_decay": 0.01, "max_grad_norm": 0.7, "mixed_precision": "bf16"}}
    )
    ds, adamw = engine_config(cfg.learner, world_size=2)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # torch's AdamW steps the offloaded state
    assert ds["gradient_clipping"] == 0.7
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (1, 1, 2)
    assert ds["bf16"] == {"enabled": True} and ds["communication_data_type"] == "fp32"
    assert "optimizer" not in ds and "scheduler" not in ds
    assert adamw == {"lr": 3e-4, "weight_decay": 0.01}


def test_user_json_is_honoured_where_it_agrees(tmp_path):
    user = {
        "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 12345, "reduce_bucket_size": 777},
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.8, 0.95], "eps": 1e-6}},
        "communication_data_type": "bf16",
    }
    cfg = _load(tmp_path, user, world_size=1, mixed_precision="bf16")
    ds, adamw = engine_config(cfg.learner, world_size=1)
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 12345
    assert ds["zero_optimization"]["reduce_bucket_size"] == 777
    assert ds["communication_data_type"] == "bf16"  # the user's choice wins over our fp32 default
    assert adamw == {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.8, 0.95), "eps": 1e-6}
    assert "optimizer" not in ds


@pytest.mark.parametrize(
    ("user", "field", "expected"),
    [
        ({"train_batch_size": 64}, "train_batch_size", "absent or 1"),
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu", "absent or 1"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps", "learner.max_tokens_per_micro_batch"),
        ({"gradient_clipping": 5.0}, "gradient_clipping", "learner.max_grad_norm = 1.0"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "optimizer.params.lr", "learner.lr = 0.0001"),
        ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}}, "optimizer.params.weight_decay", "learner.weight_decay"),
        ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type", "'AdamW'"),
        ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, "optimizer.params.amsgrad", "only lr, weight_decay"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler", "learner.lr_warmup_steps"),
        ({"fp16": {"enabled": True}}, "fp16.enabled", "learner.mixed_precision: bf16"),
        ({"bf16": {"enabled": True}}, "bf16.enabled", "learner.mixed_precision: none"),
        ({"bf16": {"check_grad_overflow": False}}, "bf16.check_grad_overflow", "skips non-finite steps"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "learner.backend.zero_stage = 3"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer.device",
         "learner.backend.offload_optimizer: false"),
        ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "zero_optimization.offload_param.device",
         "learner.backend.offload_params: false"),
    ],
)
def test_conflicting_field_names_file_field_and_expectation(tmp_path, user, field, expected):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, user, lr=1e-4, world_size=1)
    message = str(info.value)
    assert str(tmp_path / "ds.json") in message
    assert repr(field) in message
    assert expected in message


def test_offload_flag_must_agree_with_the_json_offload(tmp_path):
    with pytest.raises(ConfigError, match=r"'zero_optimization.offload_optimizer.device' is 'none'.*offload_optimizer: true"):
        _load(tmp_path, {"zero_optimization": {"offload_optimizer": {"device": "none"}}}, backend={"offload_optimizer": True})


def test_missing_json_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    cfg = load_config(_write_yaml(tmp_path, {"backend": {"type": "deepspeed", "config_file": str(missing)}}))
    with pytest.raises(ConfigError, match=rf"learner.backend.config_file {missing}: file does not exist"):
        preflight(cfg)
    preflight(cfg, files=False)  # `submit`: the file is a path on the cluster


@pytest.mark.parametrize(("content", "why"), [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_bad_json_file_is_named(tmp_path, content, why):
    path = _ds_json(tmp_path, content, "bad.json")
    with pytest.raises(ConfigError) as info:
        preflight(load_config(_write_yaml(tmp_path, {"backend": {"type": "deepspeed", "config_file": path}})))
    assert path in str(info.value) and why in str(info.value)


def test_old_spelling_loads_and_deepspeed_options_need_the_deepspeed_backend(tmp_path):
    old = load_config(_write_yaml(tmp_path, {"backend": "deepspeed", "deepspeed": {"zero_stage": 1}}))
    assert old.learner.backend.type == "deepspeed" and old.learner.backend.zero_stage == 1
    # Options of a backend that is not chosen have no place to go: refused, not ignored.
    with pytest.raises(ConfigError, match=r"learner\.deepspeed sets DeepSpeed options but learner\.backend is not deepspeed"):
        load_config(_write_yaml(tmp_path, {"deepspeed": {"config_file": str(tmp_path / "absent.json")}}))
    with pytest.raises(ConfigError, match=r"learner\.backend\.config_file: Extra inputs"):
        load_config(_write_yaml(tmp_path, {"backend": {"type": "fsdp2", "config_file": "ds.json"}}))


def test_offload_params_needs_stage_3():
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        JobConfig.model_validate({"learner": {"backend": {"type": "deepspeed", "zero_stage": 2, "offload_params": True}}})


def test_unknown_backend_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"learner\.backend"):
        load_config(_write_yaml(tmp_path, {"backend": "megatron"}))
