"""What the learner sends a vLLM engine serving the tiny vision-language model is what it trained
(`learner.freeze_vision`): after two steps and a push, the engine's log-probs of image prompts are
the learner's (its mismatch probe given the images) with the vision tower frozen and never sent,
and with it trained and sent; the same trained push without its vision tower is far off, so the
tower's weights did reach the engine (under the folder's names, which the engine checks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.multimodal import EngineImages
from tests.unit.test_vlm_learner import _batch, _chat, _learner, png, vlm  # noqa: F401  # vlm: the fixture

TOLERANCE = 1e-4  # test_vlm_parity's, the text-only one; measured 9.5e-7 (2026-11-28)


def _mismatch(engine, learner, prompts) -> float:
    """The largest |engine - learner| log-prob of responses the engine samples to `prompts`."""
    rollouts, _ = engine.generate(prompts, n=1)
    assert all(r.images for r in rollouts)
    probe = learner.probe_logprobs(
        [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], [r.images for r in rollouts]
    )
    return max((torch.tensor(p) - torch.tensor(r.rollout_logprobs)).abs().max().item() for p, r in zip(probe, rollouts))


def _trained(path, vlm, freeze: bool):  # noqa: F811
    learner = _learner(path, freeze_vision=freeze, lr=3e-2)
    for _ in range(2):
        learner.train_step(_batch(vlm))
    return learner, list(learner.named_engine_tensors(torch.float32))


def test_pushed_versions_score_image_prompts_as_the_learner(vlm):  # noqa: F811
    path, processor = vlm[0], vlm[1]
    prompts = [
        Prompt(
            "p0",
            _chat(processor, 2, "Which has more dots? "),
            "",
            images=(png("red", (84, 56), 2), png("blue", (56, 56))),
        ),
        Prompt("p1", _chat(processor, 1, "How many dots? "), "", images=(png("green", (112, 56), 3),)),
    ]
    cfg = GenerationConfig(max_model_len=256, sampling={"max_new_tokens": 8, "n": 1})
    engine = VLLMEngine(path, cfg, images=EngineImages(2))
    try:
        assert dist.is_initialized()  # the in-process engine's one-rank group: the learner joins it
        frozen, sent = _trained(path, vlm, freeze=True)
        assert not any(name.startswith("visual.") for name, _ in sent)
        engine.load_weights(1, sent)  # the engine keeps the folder's tower, which the learner kept
        assert _mismatch(engine, frozen, prompts) < TOLERANCE
        del frozen
        trained, sent = _trained(path, vlm, freeze=False)
        engine.load_weights(2, [(name, t) for name, t in sent if not name.startswith("visual.")])
        assert _mismatch(engine, trained, prompts) > 1e-2  # the learner's trained tower is not the folder's
        engine.load_weights(3, sent)
        assert _mismatch(engine, trained, prompts) < TOLERANCE
    finally:
        engine.close()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()  # the engine's group, which the learner shared: later tests make their own
