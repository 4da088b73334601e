"""A vision-language policy in the learner and the reference (issue 71): rows with images score as
`models.vision` scores each alone (the parity test ties that to the engine), through the learner's
micro-batches (padded, mixed with text rows, unpacked), its mismatch probe and the reference; the
step trains the vision tower or keeps it frozen (`learner.freeze_vision`), and what is sent to the
engines carries the folder's names, the vision weights only where they train (by fingerprints)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image, ImageDraw

from rlhf_cluster.config import JobConfig, TinyModelConfig
from rlhf_cluster.experience.records import Rollout, TrainBatch, pad_sequences
from rlhf_cluster.learner import create_learner
from rlhf_cluster.learner.base import LearnerBase, LearnerSpec
from rlhf_cluster.models.modeling import decoder_layers, load_causal_lm
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.models.vision import (
    VisionSample,
    batch_vision_inputs,
    checkpoint_name,
    load_processor,
    vision_response_logprobs,
    vision_sample,
)
from rlhf_cluster.scoring.reference import ReferenceModel
from rlhf_cluster.weights.sparse_delta import fingerprint_tensors

TOLERANCE = 1e-5  # fp32 on the CPU, as the text-only paths are compared
RESPONSES = ([100, 101, 102, 103, 104], [105, 106, 107], [108, 109, 110, 111])


def png(colour: str, size: tuple[int, int], dots: int = 1) -> bytes:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for k in range(dots):
        draw.ellipse((4 + 20 * k, 6, 20 + 20 * k, 22), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _chat(processor, images: int, question: str) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


@pytest.fixture(scope="module")
def vlm(model_cache):
    """The tiny VLM's folder, its processor and three rows: two images, none, one."""
    path = str(ensure_tiny_model(TinyModelConfig(architecture="qwen2_5_vl"), model_cache))
    processor = load_processor(path)
    images = [(png("red", (84, 56), 2), png("blue", (56, 56))), (), (png("green", (112, 56), 3),)]
    questions = ["Which has more dots? ", "3+4=", "How many dots? "]
    samples = []
    for row_images, question, response in zip(images, questions, RESPONSES):
        pil = [Image.open(io.BytesIO(data)).convert("RGB") for data in row_images]
        samples.append(vision_sample(processor, _chat(processor, len(pil), question), pil, list(response)))
    return path, processor, images, samples


@pytest.fixture(scope="module")
def expected(vlm) -> list[torch.Tensor]:
    """Each row scored alone by `vision_response_logprobs` (what the parity test holds to the engine)."""
    path, _, _, samples = vlm
    model = load_causal_lm(path)
    with torch.no_grad():
        return [vision_response_logprobs(model, sample)[0] for sample in samples]


def _batch(vlm) -> TrainBatch:
    _, _, images, samples = vlm
    prompts = [s.input_ids[: s.prompt_len].tolist() for s in samples]
    input_ids, mask, prompt_lengths, T = pad_sequences(prompts, [list(r) for r in RESPONSES])
    B = len(samples)
    response_mask = torch.zeros(B, T)
    for i, r in enumerate(RESPONSES):
        response_mask[i, : len(r)] = 1
    zeros = torch.zeros(B, T)
    return TrainBatch(
        input_ids,
        mask,
        prompt_lengths,
        response_mask,
        zeros.clone(),
        zeros.clone(),
        torch.randn(B, T),
        torch.zeros(B, dtype=torch.long),
        [f"s{i}" for i in range(B)],
        images=list(images),
    )


def _learner(path: str, **learner) -> LearnerBase:
    cfg = JobConfig.model_validate({"learner": {"world_size": 1, **learner}})
    return create_learner(LearnerSpec.of_policy(cfg), path)


def test_batch_inputs_refuse_images_that_do_not_fit_their_placeholders(vlm):
    path, processor, images, samples = vlm
    model = load_causal_lm(path)
    batch = _batch(vlm)
    inputs = batch_vision_inputs(model, processor, batch.input_ids, batch.attention_mask, batch.images)
    assert inputs is not None and inputs["position_ids"].shape == (3, *batch.input_ids.shape)
    assert inputs["image_grid_thw"].shape == (3, 3)  # every row's images, in row order
    assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod(-1).sum())
    assert (inputs["position_ids"][:, batch.attention_mask == 0] == 0).all()  # padding at 0
    assert batch_vision_inputs(model, processor, batch.input_ids, batch.attention_mask, [(), (), ()]) is None
    small = load_processor(path, max_pixels=56 * 56)  # other sizes than the engine's: other token counts
    with pytest.raises(ValueError, match="row 0: its 2 images make .* image tokens, its sequence holds"):
        batch_vision_inputs(model, small, batch.input_ids, batch.attention_mask, batch.images)


def test_learner_logprobs_of_image_rows_match_each_row_alone(gloo_group, vlm, expected):
    path, _, _, _ = vlm
    learner = _learner(path, max_tokens_per_micro_batch=2 * int(_batch(vlm).input_ids.shape[1]))
    assert learner.images is not None and len(decoder_layers(learner.model)) == TinyModelConfig().num_layers
    local = _batch(vlm)
    plan = learner._micro_batches(local, 0, 3)
    assert len(plan) == 2 and all(m.packing is None for m in plan)  # rows with images: never packed
    assert [m.inputs is not None for m in plan] == [True, False]  # the text row's pass has none
    logp = learner._frozen_logprobs(learner._to_device(local), [plan])
    probe = learner.probe_logprobs(local_prompts(vlm), [list(r) for r in RESPONSES], list(local.images or []))
    for i, want in enumerate(expected):
        n = len(RESPONSES[i])
        assert (logp[i, :n] - want).abs().max() < TOLERANCE, i
        assert (torch.tensor(probe[i]) - want).abs().max() < TOLERANCE, i
    # The images are used: the same rows with the images swapped between the first and last row's
    # places would not fit their placeholders; other pixels of the same sizes score differently.
    other = _batch(vlm)
    other.images = [
        tuple(png("black", (84, 56)) if k == 0 else png("yellow", (56, 56)) for k in range(2)),
        (),
        (png("black", (112, 56)),),
    ]
    moved = learner._frozen_logprobs(learner._to_device(other), [learner._micro_batches(other, 0, 3)])
    assert (moved[0, :5] - logp[0, :5]).abs().max() > 1e-2


def local_prompts(vlm) -> list[list[int]]:
    return [s.input_ids[: s.prompt_len].tolist() for s in vlm[3]]


def test_reference_scores_rollouts_with_their_images(vlm, expected):
    path, _, images, _ = vlm
    rollouts = [
        Rollout(f"s{i}", f"p{i}", "g", prompt, list(response), [0.0] * len(response), 0, "length", images=row_images)
        for i, (prompt, response, row_images) in enumerate(zip(local_prompts(vlm), RESPONSES, images))
    ]
    scored = ReferenceModel(path).logprobs(rollouts)
    for got, want in zip(scored, expected):
        assert (torch.tensor(got) - want).abs().max() < TOLERANCE


def _vision(named) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in named if n.startswith("visual.")]


@pytest.mark.parametrize("freeze", [True, False])
@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_freeze_vision_trains_and_sends_the_vision_tower_only_when_false(gloo_group, vlm, freeze, backend):
    from safetensors.torch import load_file

    path, _, _, _ = vlm
    folder = load_file(f"{path}/model.safetensors")
    learner = _learner(path, freeze_vision=freeze, lr=1e-2, backend={"type": backend})
    trainable = {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert any("visual" in n for n in trainable) != freeze and any("language_model" in n for n in trainable)
    learner.train_step(_batch(vlm))
    sent = list(learner.named_engine_tensors(torch.float32))
    names = {n for n, _ in sent}
    assert names <= set(folder) and names == {n for n in folder if not (freeze and n.startswith("visual."))}
    assert dict(learner.named_full_tensors(torch.float32)).keys() == names  # the same, one rank
    before = fingerprint_tensors(0, "", _vision(sorted(folder.items())))
    held = fingerprint_tensors(  # the learner's own tower, under the folder's names
        0, "", _vision(sorted((checkpoint_name(n, "qwen2_5_vl"), t) for n, t in learner.named_full_tensors()))
    )
    if freeze:
        assert not _vision(sent) and held == before  # the tower kept as the folder has it, none of it sent
    else:
        assert fingerprint_tensors(0, "", _vision(sorted(sent, key=lambda nt: nt[0]))) == held != before
    language = [(n, t) for n, t in sorted(sent, key=lambda nt: nt[0]) if n.startswith("model.layers.")]
    assert fingerprint_tensors(0, "", language) != fingerprint_tensors(
        0, "", [(n, folder[n]) for n, _ in language]
    )  # the language model trained either way


def test_text_rows_of_a_vlm_pack_as_a_text_models(gloo_group, vlm):
    path, processor, _, _ = vlm
    prompts = [processor.tokenizer(_chat(processor, 0, q))["input_ids"] for q in ("3+4=", "What is 12+9? ", "1+1=")]
    responses = [list(range(100, 160)), [106, 107], [108, 109, 110]]  # a long row and two that share a packed one
    model = load_causal_lm(path)
    learner = _learner(path)
    input_ids, mask, prompt_lengths, T = pad_sequences(prompts, responses)
    response_mask = (torch.arange(T)[None] < torch.tensor([len(r) for r in responses])[:, None]).float()
    zeros = torch.zeros(3, T)
    local = TrainBatch(
        input_ids,
        mask,
        prompt_lengths,
        response_mask,
        zeros,
        zeros,
        zeros,
        torch.zeros(3, dtype=torch.long),
        ["a", "b", "c"],
    )
    plan = learner._micro_batches(local, 0, 3)
    assert [m.packing is not None and m.inputs is None for m in plan] == [True]
    logp = learner._frozen_logprobs(learner._to_device(local), [plan])
    with torch.no_grad():
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            alone = VisionSample(torch.tensor(prompt + response), len(prompt), None, None)
            assert (logp[i, : len(response)] - vision_response_logprobs(model, alone)[0]).abs().max() < TOLERANCE
