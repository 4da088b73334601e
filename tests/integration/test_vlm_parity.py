"""A vLLM engine serving the tiny vision-language model and the learner's forward agree on the
log-probs of responses to prompts with images, as closely as they do on text: one in-process
engine (the project's engine settings) samples from prompts of one, two and no images, at
temperatures 1 and 0.7, and `models.vision` scores the same responses given the processor's
pixel values, grids and multimodal rotary positions."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image, ImageDraw

from rlhf_cluster.config import GenerationConfig, TinyModelConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.multimodal import engine_mm_args, engine_request
from rlhf_cluster.generation.vllm_process import configure_vllm_environment, engine_settings
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.models.vision import load_processor, load_vision_lm, vision_response_logprobs, vision_sample

# The text-only tolerance (tests/integration/test_weight_reload.py): fp32 engine vs fp32 HF forward.
TOLERANCE = 1e-4
MAX_TOKENS = 8


def dots(colour: str, size: tuple[int, int], count: int = 1) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for k in range(count):
        draw.ellipse((6 + 22 * k, 8, 24 + 22 * k, 26), fill=colour)
    return image


def chat(processor, images: list[Image.Image], question: str) -> str:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def vlm_path(model_cache) -> str:
    return str(ensure_tiny_model(TinyModelConfig(architecture="qwen2_5_vl"), model_cache))


def _generate(path: str, requests: list[dict], temperatures: list[float]) -> list:
    """Sample one response per request (at its temperature) from one in-process engine; the
    finished outputs in order."""
    cfg = GenerationConfig(max_model_len=256)
    configure_vllm_environment(cfg)
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(**engine_settings(path, cfg, "float32", 0), **engine_mm_args(2))
    engine = LLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
    for k, (request, temperature) in enumerate(zip(requests, temperatures)):
        params = SamplingParams(
            temperature=temperature,
            max_tokens=MAX_TOKENS,
            ignore_eos=True,
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        engine.add_request(str(k), request, params)
    finished = {}
    try:
        while engine.has_unfinished_requests():
            finished.update({out.request_id: out for out in engine.step() if out.finished})
    finally:  # vLLM's teardown now, not under a later test's engine when this one is collected
        engine.engine_core.shutdown()
    return [finished[str(k)] for k in range(len(requests))]


def test_engine_and_learner_logprobs_agree_on_image_prompts(vlm_path):
    processor = load_processor(vlm_path)
    prompts = [  # images, question, sampling temperature (the engine's log-probs are after it)
        ([dots("red", (80, 60))], "How many dots? ", 1.0),
        ([dots("blue", (120, 90), 3), dots("green", (56, 56), 2)], "Which has more dots? ", 0.7),
        ([], "3+4=", 1.0),
    ]
    texts = [chat(processor, images, question) for images, question, _ in prompts]
    # As the generation engine sends a prompt: its images as the prompt file's bytes, decoded.
    requests = [engine_request(Prompt(f"p{k}", text, "", images=tuple(png(im) for im in images)))
                for k, (text, (images, _, _)) in enumerate(zip(texts, prompts))]
    outputs = _generate(vlm_path, requests, [temperature for _, _, temperature in prompts])
    model = load_vision_lm(vlm_path)
    worst = 0.0
    for text, (images, _, temperature), out in zip(texts, prompts, outputs):
        completion = out.outputs[0]
        engine_logp = torch.tensor([lp[tok].logprob for lp, tok in zip(completion.logprobs, completion.token_ids)])
        sample = vision_sample(processor, text, images, list(completion.token_ids))
        # vLLM expanded each image placeholder to exactly the learner's image tokens.
        assert sample.input_ids[: sample.prompt_len].tolist() == list(out.prompt_token_ids)
        with torch.no_grad():
            learner_logp, metrics = vision_response_logprobs(model, sample, temperature)
        assert metrics["response_tokens"] == MAX_TOKENS == len(engine_logp)
        worst = max(worst, (learner_logp - engine_logp).abs().max().item())
        if images:
            # The images matter: the same response given other images scores differently.
            other = [im.transpose(Image.Transpose.ROTATE_90) for im in images]
            with torch.no_grad():
                moved_sample = vision_sample(processor, text, other, sample_ids(sample))
                moved, _ = vision_response_logprobs(model, moved_sample, temperature)
            assert (moved - learner_logp).abs().max() > 100 * TOLERANCE
    print(f"engine vs learner max |logp diff| over image prompts: {worst:.3g}")
    assert worst < TOLERANCE


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def sample_ids(sample) -> list[int]:
    return sample.input_ids[sample.prompt_len :].tolist()
