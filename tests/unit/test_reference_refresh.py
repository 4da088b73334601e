"""Reference refresh's folders (`rlhf_cluster/weights/reference_refresh.py`): a refresh is the stored
version (mix 1) or its mix with the reference before it, for the tensors the policy trains, every
other tensor and file as the base folder has them, written whole or not at all; which folder a
version loads; what a rollback and retention remove. Real files: a tiny model folder built in
code, a real WeightStore, the folders loaded by the reference model's own loading code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from rlhf_cluster.weights import reference_refresh as folders
from rlhf_cluster.weights.export import NOTE, reference_version_of
from rlhf_cluster.weights.reference_refresh import folder_of, reference_version, write_reference, written
from rlhf_cluster.weights.store import WeightStore


def _base(tiny_model_path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(tiny_model_path) / "model.safetensors"))


def _trained(base: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The policy after `step` steps: every tensor but the last (by name) moved, as a learner that
    does not send one (a frozen part, a tied output embedding) publishes it."""
    names = sorted(base)[:-1]
    return {k: base[k] + 0.01 * step * (i + 1) for i, k in enumerate(names)}


@pytest.fixture
def store(tmp_path, tiny_model_path):
    store = WeightStore(tmp_path / "weights", keep=10)
    base = _base(tiny_model_path)
    for v in (2, 4):  # in bf16, as engines often take the weights
        store.publish(v, {k: t.to(torch.bfloat16) for k, t in _trained(base, v).items()})
    yield store
    store.close()


def test_which_version_a_policy_version_loads_its_reference_from():
    assert [reference_version(v, 3) for v in range(8)] == [0, 0, 0, 3, 3, 3, 6, 6]


def test_a_hard_refresh_is_the_stored_version_and_the_rest_of_the_base(store, tiny_model_path, tmp_path):
    base, root = _base(tiny_model_path), tmp_path / "reference"
    out = write_reference(store, 2, Path(tiny_model_path), Path(tiny_model_path), 1.0, folder_of(root, 2))
    assert out == root / "v00000002" and written(root) == {2: out}
    got = safetensors.torch.load_file(str(out / "model.safetensors"))
    stored = store.load(2)
    assert set(got) == set(base)
    for name, tensor in got.items():
        assert torch.equal(tensor, stored.get(name, base[name])), name
    assert (out / "config.json").read_text() == (Path(tiny_model_path) / "config.json").read_text()
    assert reference_version_of(out) == 2 and reference_version_of(tiny_model_path) == 0
    assert json.loads((out / NOTE).read_text())["mix"] == 1.0
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert not list((store.version_dir(2) / "readers").glob("*"))  # its lease released


def test_a_mixed_refresh_moves_part_way_from_the_reference_before_it(store, tiny_model_path, tmp_path):
    from rlhf_cluster.scoring.reference import ReferenceModel

    base, root, mix = _base(tiny_model_path), tmp_path / "reference", 0.25
    first = write_reference(store, 2, Path(tiny_model_path), Path(tiny_model_path), mix, folder_of(root, 2))
    second = write_reference(store, 4, Path(tiny_model_path), first, mix, folder_of(root, 4))
    one = safetensors.torch.load_file(str(first / "model.safetensors"))
    two = safetensors.torch.load_file(str(second / "model.safetensors"))
    v2, v4 = (store.load(v) for v in (2, 4))
    for name in base:
        if name not in v2:  # not trained: the base's, bit for bit
            assert torch.equal(one[name], base[name]) and torch.equal(two[name], base[name])
            continue
        assert one[name].dtype == torch.float32  # mixed folders keep float32 (bf16 would round small moves away)
        assert torch.allclose(one[name], mix * v2[name].float() + (1 - mix) * base[name], atol=1e-6), name
        assert torch.allclose(two[name], mix * v4[name].float() + (1 - mix) * one[name], atol=1e-6), name
        assert not torch.equal(two[name], v4[name].float())
    # The reference pool's own loading code takes the folder.
    assert ReferenceModel(str(second)).model.config.vocab_size > 0


def test_which_folder_a_version_loads_and_a_missing_one_named(tmp_path, tiny_model_path):
    root = tmp_path / "reference"
    assert folders.reference_folder(root, tiny_model_path, 2, every=3) == Path(tiny_model_path)
    folder_of(root, 3).mkdir(parents=True)
    assert folders.reference_folder(root, tiny_model_path, 5, every=3) == folder_of(root, 3)
    with pytest.raises(FileNotFoundError, match=r"v00000006: the reference refreshed at weight version 6 .* version 7"):
        folders.reference_folder(root, tiny_model_path, 7, every=3)


def test_rollback_and_retention_remove_the_right_folders(tmp_path):
    root = tmp_path / "reference"
    for v in (2, 4, 6, 8):
        folder_of(root, v).mkdir(parents=True)
    (root / ".v00000010.tmp").mkdir()  # a write in progress is no refresh
    assert list(written(root)) == [2, 4, 6, 8]
    assert folders.discard_after(root, 6) == [8]  # a rollback to version 6 keeps 6's own refresh
    assert not (root / ".v00000010.tmp").exists()  # and a write a kill cut short
    assert folders.prune(root, 2, [5, 6]) == [2]  # checkpoint 5 loads 4's, 6 its own
    assert list(written(root)) == [4, 6]


def test_a_pruned_version_is_named(store, tiny_model_path, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"version 3 is gone before the reference refresh read it"):
        write_reference(store, 3, Path(tiny_model_path), Path(tiny_model_path), 1.0, tmp_path / "v3")
    assert not (tmp_path / "v3").exists()


def test_config_rules(job_config):
    from rlhf_cluster.config import ConfigError
    from rlhf_cluster.job.preflight import CONFIG_RULES, WARNING_RULES

    def problems(rules, **sections):
        cfg = job_config(reference=True, **sections)
        return [p for rule in rules for p in rule(cfg)]

    refresh = {"reference_refresh": {"every_steps": 2}}
    assert problems(CONFIG_RULES, algorithm={"kl": {"coef": 0.01, **refresh}}) == []
    assert job_config(reference=True, algorithm={"kl": {"coef": 0.01, **refresh}}).reference_refresh_every == 2
    assert any("learner.lora" in p and "reference_refresh" in p for p in problems(
        CONFIG_RULES, algorithm={"kl": {"coef": 0.01, **refresh}}, learner={"lora": {"rank": 4}}))  # fmt: skip
    assert any(
        "no KL term reads the reference" in p
        for p in problems(CONFIG_RULES, algorithm={"kl": {"coef": 0.0, **refresh}})
    )
    assert any("no KL term reads the reference" in p for p in problems(
        CONFIG_RULES, algorithm={"kl": {"coef": 0.01, "placement": "none", **refresh}}))  # fmt: skip
    assert any("ends before its first refresh" in p for p in problems(
        WARNING_RULES, algorithm={"kl": {"coef": 0.01, "reference_refresh": {"every_steps": 4}}}))  # fmt: skip
    with pytest.raises((ConfigError, ValueError), match="algorithm.kl.reference_refresh"):
        job_config(scoring={"reference": False}, reference=True, algorithm={"kl": {"coef": 0.0, **refresh}})
    with pytest.raises((ConfigError, ValueError), match="mix"):
        job_config(reference=True, algorithm={"kl": {"coef": 0.01, "reference_refresh": {"every_steps": 2, "mix": 0}}})
