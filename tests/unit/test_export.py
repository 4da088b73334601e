"""`rlhf-cluster export` / `export_policy`: a run's weight version as a Hugging Face folder that
transformers loads, every tensor the version's, and what the store leaves out (a tied output
embedding, a VLM's frozen vision tower) as the base folder has it, its tokenizer and chat template
beside them. Real files throughout: a model folder built in code, a real WeightStore, the run's
config.yaml written as the driver writes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from actors.commands.cli import app
from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.weights import export as export_module
from rlhf_cluster.weights.export import NOTE, export_policy, exported_version
from rlhf_cluster.weights.store import WeightStore
from tests.byo import save_chat_model


def _run(job_config, **model) -> Path:
    """A run directory whose config.yaml is what the driver writes for this model section."""
    cfg = job_config(model=model)
    run = RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir)
    run.root.mkdir(parents=True)
    run.write_yaml(RunDir.CONFIG, cfg.model_dump(mode="json"))
    return run.root


def _publish(run_dir: Path, versions: dict[int, dict[str, torch.Tensor]]) -> None:
    store = WeightStore(run_dir / "weights")
    for version, tensors in versions.items():
        store.publish(version, tensors)
    store.close()


def _trained(base: Path, step: int, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The base folder's tensors moved as a step would move them; those starting with `skip`
    (what the learner does not send) left out."""
    tensors = safetensors.torch.load_file(str(base / "model.safetensors"))
    return {k: v + 0.01 * step * (i + 1) for i, (k, v) in enumerate(sorted(tensors.items())) if not k.startswith(skip)}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tied Qwen2 whose folder holds `lm_head.weight` too (some checkpoints of tied models do)."""
    folder = save_chat_model(tmp_path_factory.mktemp("chat"))
    tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # transformers saves a tied one once
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    safetensors.torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _load(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_export_of_a_tied_model_is_the_version_with_its_tokenizer(job_config, chat_model, tmp_path):
    run_dir = _run(job_config, path=str(chat_model))
    versions = {v: _trained(chat_model, v, skip=("lm_head.",)) for v in (1, 2)}  # tied: the learner sends no lm_head
    _publish(run_dir, versions)
    out = export_policy(run_dir, tmp_path / "hf")
    assert exported_version(out) == 2
    loaded = _load(out)
    for name, tensor in versions[2].items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["lm_head.weight"], versions[2]["model.embed_tokens.weight"])  # not the base's
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), versions[2]["model.embed_tokens.weight"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Sam has 12 apples and buys 30 more."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")
    assert json.loads((out / NOTE).read_text())["from_base"] == []
    # An older version the store still holds, by number.
    first = export_policy(run_dir, tmp_path / "v1", version=1)
    assert torch.equal(_load(first)["model.norm.weight"], versions[1]["model.norm.weight"])


def test_the_tiny_model_and_sharded_output(job_config, tiny_model_path, tmp_path, monkeypatch):
    run_dir = _run(job_config)  # no model.path: the tiny model built in model.cache_dir
    version = _trained(Path(tiny_model_path), 1)
    _publish(run_dir, {1: version})
    monkeypatch.setattr(export_module, "SHARD_BYTES", 64 << 10)
    out = export_policy(run_dir, tmp_path / "hf")
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    loaded = _load(out)
    assert set(loaded) == set(version)
    for name, tensor in version.items():
        assert torch.equal(loaded[name], tensor), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_a_vlm_takes_its_vision_tower_from_the_base(job_config, model_cache, tmp_path):
    base = ensure_tiny_model(TinyModelConfig(architecture="qwen2_5_vl"), model_cache)
    run_dir = _run(job_config, tiny={"architecture": "qwen2_5_vl"})
    version = _trained(base, 1, skip=("visual.",))  # the frozen vision tower is not sent
    _publish(run_dir, {1: version})
    out = export_policy(run_dir, tmp_path / "hf")
    written = safetensors.torch.load_file(str(out / "model.safetensors"))
    in_base = safetensors.torch.load_file(str(base / "model.safetensors"))
    assert set(written) == set(in_base)
    for name, tensor in written.items():
        assert torch.equal(tensor, version.get(name, in_base[name])), name
    tower = sorted(n for n in in_base if n.startswith("visual."))
    assert tower and json.loads((out / NOTE).read_text())["from_base"] == tower
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).is_file() == (base / name).is_file(), name
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(out).tokenizer.decode([5]) == AutoProcessor.from_pretrained(base).tokenizer.decode([5])


def test_refusals(job_config, chat_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .*nowhere does not exist"):
        export_policy(tmp_path / "nowhere", tmp_path / "hf")
    run_dir = _run(job_config, path=str(chat_model))
    with pytest.raises(FileNotFoundError, match="holds no weight version"):
        export_policy(run_dir, tmp_path / "hf")
    _publish(run_dir, {3: _trained(chat_model, 3, skip=("lm_head.",)), 4: _trained(chat_model, 4, skip=("lm_head.",))})
    with pytest.raises(ValueError, match=r"--version 1: weight store .* holds versions 3, 4: older ones are pruned"):
        export_policy(run_dir, tmp_path / "hf", version=1)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"--out .*taken: is not empty \(--overwrite replaces an earlier export"):
        export_policy(run_dir, tmp_path / "taken")
    # Found in review: --overwrite replaced any folder (a home, a folder of runs). Only an earlier export now.
    with pytest.raises(ValueError, match=r"--out .*taken: holds files but no earlier export \(rlhf_export.json\)"):
        export_policy(run_dir, tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    export_policy(run_dir, tmp_path / "hf", version=3)
    export_policy(run_dir, tmp_path / "hf", overwrite=True)
    assert exported_version(tmp_path / "hf") == 4
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()  # not 0600
    for out in (run_dir, run_dir.parent, run_dir / "weights" / "x", chat_model / "x"):
        with pytest.raises(ValueError, match="is or holds the run directory, or lies in its weight store or the base"):
            export_policy(run_dir, out, overwrite=True)
    assert (run_dir / "config.yaml").is_file()
    export_policy(run_dir, run_dir / "hf")  # inside the run directory itself is fine


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_adapters_alone_are_refused(job_config, chat_model, tmp_path):
    run_dir = _run(job_config, path=str(chat_model))
    adapter = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _publish(run_dir, {1: {adapter: torch.zeros(4, 64)}})
    with pytest.raises(ValueError, match="LoRA adapters alone .*learner.lora.sync: merged"):
        export_policy(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_damaged_shard_is_refused(job_config, chat_model, tmp_path):
    run_dir = _run(job_config, path=str(chat_model))
    _publish(run_dir, {1: _trained(chat_model, 1, skip=("lm_head.",))})
    shard = next((run_dir / "weights" / "v00000001").glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="does not match the manifest"):
        export_policy(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def test_cli(job_config, chat_model, tmp_path):
    run_dir = _run(job_config, path=str(chat_model))
    _publish(run_dir, {2: _trained(chat_model, 2, skip=("lm_head.",))})
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"exported weight version 2 of {run_dir} to {tmp_path / 'hf'}"
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "hf"), "--version", "7"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: --version 7: weight store {run_dir / 'weights'} holds versions 2: newer than its newest: only "
        "some versions are written to it (weights.persist_every, checkpoints')"
    ]
    # Trial 23b E2: version 0 and a pruned one are told apart from a version never written.
    zero = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "hf0"), "--version", "0"])
    assert zero.exit_code == 2 and "version 0 is the base model" in zero.output
    pruned = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "hf1"), "--version", "1"])
    assert pruned.exit_code == 2 and "older ones are pruned (weights.keep)" in pruned.output
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 2 and "--overwrite replaces an earlier export" in result.output
    shutil.rmtree(tmp_path / "hf")


def test_a_run_trained_past_the_stores_newest_version_is_said_at_export(job_config, chat_model, tmp_path, caplog):
    """Trial 23b E1: a job stopped between persisted versions (direct transport, `persist_every`)
    trained to a version the store does not hold; export wrote the store's newest without a word."""
    import json
    import logging

    run_dir = _run(job_config, path=str(chat_model))
    _publish(run_dir, {2: _trained(chat_model, 2, skip=("lm_head.",))})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "weight_version": s + 1}) + "\n" for s in range(3)))
    with caplog.at_level(logging.WARNING, logger="rlhf_cluster.weights.export"):
        export_policy(run_dir, tmp_path / "hf")
    assert "the run trained to weight version 3, the store's newest is 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_cluster.weights.export"):
        export_policy(run_dir, tmp_path / "hf2", version=2)  # asked for: nothing to say
    assert "trained to" not in caplog.text
