"""The learner's streamed gather (`named_full_tensors`, one tensor at a time) yields exactly
what torch's full state dict holds, with and without LoRA (merged under the plain names)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from rlhf_cluster.config import JobConfig
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.learner.spec import LearnerSpec
from rlhf_cluster.models.lora import merge_lora_state_dict


@pytest.mark.parametrize("lora", [False, True])
def test_streamed_gather_equals_full_state_dict(gloo_group, tiny_model_path, lora):
    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "lora": {"rank": 4 if lora else 0}}})
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
    if lora:  # non-zero adapters, so the merge changes the weights
        with torch.no_grad():
            for name, param in learner.model.named_parameters():
                if "lora_B" in name:  # world size 1: the local shard is the whole tensor
                    param.to_local().normal_()
    expected = get_model_state_dict(learner.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if lora:
        expected = merge_lora_state_dict(expected, cfg.learner.lora.alpha / cfg.learner.lora.rank)
    streamed = list(learner.named_full_tensors())
    assert [name for name, _ in streamed] == list(expected)
    for name, tensor in streamed:
        assert torch.equal(tensor, expected[name]), name
    if lora:
        base = FSDP2Learner(LearnerSpec.of_policy(JobConfig.model_validate({"learner": {"world_size": 1}})), tiny_model_path)
        plain = dict(base.named_full_tensors())
        assert list(plain) == [name for name, _ in streamed]
        assert any(not torch.equal(plain[n], t) for n, t in streamed)  # the adapters were merged in


@pytest.mark.parametrize("lora", [False, True])
def test_the_engines_gather_is_cast_on_the_device_and_sends_a_tied_embedding_once(gloo_group, tmp_path, lora):
    from tests.byo import save_chat_model

    model = save_chat_model(tmp_path / "tied")  # Qwen2 with tie_word_embeddings
    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "lora": {"rank": 4 if lora else 0}}})
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), str(model))
    full = dict(learner.named_full_tensors())
    assert "lm_head.weight" in full and torch.equal(full["lm_head.weight"], full["model.embed_tokens.weight"])
    engine = list(learner.named_full_tensors(torch.bfloat16))
    assert [n for n, _ in engine] == [n for n in full if n != "lm_head.weight"]
    for name, tensor in engine:
        assert tensor.device.type == "cpu" and tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, full[name].to(torch.bfloat16)), name
    # What the engine holds is a copy: training on does not change it.
    before = {n: t.clone() for n, t in engine}
    with torch.no_grad():
        for param in learner.model.parameters():
            param.to_local().add_(1.0)
    assert all(torch.equal(before[n], t) for n, t in engine)


@pytest.mark.parametrize("sync", ["adapters", "merged"])
def test_the_engines_get_the_adapters_alone_or_the_merged_model(gloo_group, tiny_model_path, sync):
    from rlhf_cluster.generation.lora_adapters import AdapterSlot
    from rlhf_cluster.models.quantization import checkpoint_spec

    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "lora": {"rank": 4, "sync": sync}}})
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
    sent = dict(learner.named_engine_tensors(torch.bfloat16))
    if sync == "merged":
        assert sent.keys() == {n for n, _ in learner.named_full_tensors(torch.bfloat16)}
        return
    # peft's saved names and shapes, exactly the layout an engine's adapter slot accepts.
    slot = AdapterSlot(cfg.learner.lora, checkpoint_spec(tiny_model_path), "gen0")
    try:
        assert sent.keys() == slot.spec.keys()
        assert all(t.dtype == torch.bfloat16 and tuple(t.shape) == slot.spec[n][1] for n, t in sent.items())
        assert all(not t.any() for n, t in sent.items() if ".lora_B." in n)  # B starts at zero: version 0 is the base
    finally:
        slot.close()
