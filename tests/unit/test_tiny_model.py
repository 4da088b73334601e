import json

import pytest

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.models.tiny_model import PAD, EOS, ensure_tiny_model, tiny_model_dir

CFG = TinyModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("models")
    return cache, ensure_tiny_model(CFG, cache)


def test_builds_into_cache_dir(built):
    cache, path = built
    assert path == tiny_model_dir(CFG, cache)
    assert path.parent == cache
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file(), name
    # only the finished folder remains: no temp build folders
    assert [p.name for p in cache.iterdir()] == [path.name]


def test_second_call_uses_cache(built):
    cache, path = built
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    again = ensure_tiny_model(CFG, cache)
    assert again == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
    assert [p.name for p in cache.iterdir()] == [path.name]


def test_cache_key_depends_on_config(tmp_path):
    other = CFG.model_copy(update={"seed": 1})
    assert tiny_model_dir(other, tmp_path) != tiny_model_dir(CFG, tmp_path)
    assert tiny_model_dir(CFG, tmp_path) == tiny_model_dir(TinyModelConfig(**CFG.model_dump()), tmp_path)


def _load_tokenizer(path, auto):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    return (AutoTokenizer if auto else PreTrainedTokenizerFast).from_pretrained(path)


@pytest.mark.parametrize("auto", [False, True], ids=["fast", "auto"])
def test_tokenizer_round_trip_and_single_digits(built, auto):
    _, path = built
    tok = _load_tokenizer(path, auto)
    text = "12+7=19"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(" 3 + 45 = 48", add_special_tokens=False)) == " 3 + 45 = 48"
    pieces = tok.convert_ids_to_tokens(tok.encode("1234567890", add_special_tokens=False))
    assert pieces == list("1234567890")
    digit_ids = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    assert len(set(digit_ids)) == 10 and tok.unk_token_id not in digit_ids
    assert tok.pad_token == PAD and tok.eos_token == EOS
    assert tok.pad_token_id != tok.eos_token_id


def test_model_config(built):
    _, path = built
    config = json.loads((path / "config.json").read_text())
    tok = _load_tokenizer(path, auto=False)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert head_dim >= 32
    assert config["vocab_size"] == len(tok)
    assert config["num_hidden_layers"] == 1
    assert config["eos_token_id"] == tok.eos_token_id
    assert config["pad_token_id"] == tok.pad_token_id
    assert config["model_type"] == "qwen2"


def test_auto_tokenizer_size_matches_model(built):
    _, path = built
    config = json.loads((path / "config.json").read_text())
    tok = _load_tokenizer(path, auto=True)
    assert len(tok) == config["vocab_size"]
    assert all(i < config["vocab_size"] for i in tok.all_special_ids)


def test_vocab_size_is_an_upper_bound(built):
    _, path = built
    assert len(_load_tokenizer(path, auto=False)) <= CFG.vocab_size


def test_model_forward(built):
    import torch
    from transformers import AutoModelForCausalLM

    _, path = built
    tok = _load_tokenizer(path, auto=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([tok.encode("12+7=", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
