"""Engine settings users set by config: vLLM's own arguments are checked against vLLM's EngineArgs,
and the ones the project sets from its own fields cannot be set a second way."""

import pytest

from rlhf_cluster.config import ConfigError, load_config
from rlhf_cluster.job.preflight import preflight


def test_engine_kwargs_typo_names_the_field():
    with pytest.raises(ConfigError, match=r"generation\.engine_kwargs: not a vllm EngineArgs field: block_sise"):
        preflight(load_config(None, ["generation.engine_kwargs={block_sise: 16}"]))
    preflight(load_config(None, ["generation.engine_kwargs={block_size: 16}"]))  # the control: a real field passes


@pytest.mark.parametrize("key, field", [("dtype", "generation.dtype"), ("tensor_parallel_size", "generation.tensor_parallel_size"),
                                        ("speculative_config", "generation.speculative"), ("model", "model.path")])
def test_engine_kwargs_cannot_set_what_has_its_own_field(key, field):
    with pytest.raises(ConfigError, match=rf"{key} \(set it with {field}\)"):
        load_config(None, [f"generation.engine_kwargs={{{key}: 1}}"])


def test_tensor_parallel_engines_reserve_their_gpus():
    with pytest.raises(ConfigError, match="num_gpus=2 is fewer than tensor_parallel_size=4"):
        load_config(None, ["generation.tensor_parallel_size=4", "generation.resources={num_gpus: 2}"])
    cfg = load_config(None, ["generation.tensor_parallel_size=4", "generation.resources={num_gpus: 4}"])
    assert cfg.generation.tensor_parallel_size == 4


def test_speculative_settings_become_vllms():
    ngram = load_config(None, ["generation.speculative={method: ngram, num_speculative_tokens: 2, prompt_lookup_max: 3}"])
    assert ngram.generation.speculative.engine_config() == {
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    draft = load_config(None, ["generation.speculative={method: draft_model, model: /models/qwen-0.5b}"])
    assert draft.generation.speculative.engine_config()["model"] == "/models/qwen-0.5b"
    with pytest.raises(ConfigError, match="generation.speculative.model"):
        load_config(None, ["generation.speculative={method: draft_model}"])
    with pytest.raises(ConfigError, match="prompt_lookup_min"):
        load_config(None, ["generation.speculative={method: ngram, prompt_lookup_min: 5, prompt_lookup_max: 2}"])


def test_engine_dtype_defaults_to_the_models():
    assert load_config(None, ["model.dtype=bfloat16"]).engine_dtype == "bfloat16"
    assert load_config(None, ["model.dtype=float32", "generation.dtype=bfloat16"]).engine_dtype == "bfloat16"


def test_engine_settings_from_the_generation_config():
    """What the engine is started with: log-probs after temperature (the learner's view), the
    scheduler stats the batch recorder reads, and on the CPU eager mode and `kv_cache_gb`."""
    import torch

    from rlhf_cluster.generation.vllm_process import engine_settings

    cfg = load_config(None, ["generation.kv_cache_gb=2", "generation.max_num_seqs=24"]).generation
    settings = engine_settings("/models/tiny", cfg, "bfloat16", 7)
    assert (settings["model"], settings["dtype"], settings["seed"]) == ("/models/tiny", "bfloat16", 7)
    assert settings["logprobs_mode"] == "processed_logprobs" and settings["disable_log_stats"] is False
    assert settings["max_num_seqs"] == 24 and settings["speculative_config"] is None
    if not torch.cuda.is_available():
        assert settings["enforce_eager"] is True and settings["kv_cache_memory_bytes"] == 2 << 30


def test_every_engine_argument_the_project_sets_is_refused_in_engine_kwargs():
    """A user's `engine_kwargs` cannot name an argument the engine already gets (vLLM would fail at
    start with a TypeError about a repeated keyword): each is refused by the config, naming its field."""
    from rlhf_cluster.generation.vllm_process import engine_settings

    cfg = load_config(None, []).generation
    assert set(engine_settings("/models/tiny", cfg, "float32", 0)) <= set(type(cfg).OWN_ENGINE_ARGS)
    with pytest.raises(ConfigError, match="disable_log_stats"):
        load_config(None, ["generation.engine_kwargs={disable_log_stats: true}"])
