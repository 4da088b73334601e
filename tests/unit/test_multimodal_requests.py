"""The engine's image requests and its image caches (vLLM itself stood in for)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhf_cluster.generation.multimodal import (
    EngineImages,
    collapsed_placeholders,
    drop_image_embeddings,
    engine_mm_args,
    image_request,
    serves_images,
    turn_request,
)


def test_image_request_carries_the_images_in_order():
    images = [object(), object()]
    request = image_request("<|image_pad|> and <|image_pad|>", images)
    assert request == {"prompt": "<|image_pad|> and <|image_pad|>", "multi_modal_data": {"image": images}}
    by_ids = image_request((1, 2, 3), images[:1])
    assert by_ids["prompt_token_ids"] == [1, 2, 3] and by_ids["multi_modal_data"]["image"] == images[:1]
    assert image_request("3+4=", []) == {"prompt": "3+4="}  # no images: a plain request


def test_engine_mm_args_bound_the_images_and_refuse_none():
    assert engine_mm_args(2) == {"limit_mm_per_prompt": {"image": 2, "video": 0}}
    sized = engine_mm_args(EngineImages(3, max_pixels=3136))  # the data's size limit reaches vLLM's processor
    assert sized["mm_processor_kwargs"] == {"max_pixels": 3136} and sized["limit_mm_per_prompt"]["image"] == 3
    with pytest.raises(ValueError, match=">= 1"):
        engine_mm_args(0)


def test_image_caches():
    calls = []
    engine = SimpleNamespace(
        model_config=SimpleNamespace(is_multimodal_model=True), reset_encoder_cache=lambda: calls.append(1)
    )
    assert serves_images(engine)
    assert not serves_images(SimpleNamespace(model_config=SimpleNamespace(is_multimodal_model=False)))
    drop_image_embeddings(engine)
    assert calls == [1]


def test_a_prompts_engine_request_decodes_its_images_beside_its_tokens():
    import io

    from PIL import Image

    from rlhf_cluster.data.prompts import Prompt
    from rlhf_cluster.generation.multimodal import engine_request

    def png(size, colour):
        out = io.BytesIO()
        Image.new("L", size, colour).save(out, format="PNG")
        return out.getvalue()

    prompt = Prompt("p", "text", "1", token_ids=(7, 8, 9), images=(png((30, 20), 10), png((8, 8), 200)))
    request = engine_request(prompt)
    assert request["prompt_token_ids"] == [7, 8, 9]
    assert [(im.mode, im.size) for im in request["multi_modal_data"]["image"]] == [("RGB", (30, 20)), ("RGB", (8, 8))]
    assert engine_request(Prompt("t", "3+4=", "7")) == "3+4="
    assert engine_request(Prompt("t", "3+4=", "7", token_ids=(1, 2)))["prompt_token_ids"] == [1, 2]  # TokensPrompt


def test_a_later_turn_goes_in_with_one_placeholder_per_image_and_every_image():
    pad = 9
    expanded = [1, 8, pad, pad, pad, 7, 2, 8, pad, pad, 7, 3]  # two images the engine expanded, then text
    assert collapsed_placeholders(expanded, pad) == [1, 8, pad, 7, 2, 8, pad, 7, 3]
    png = _png((8, 8), "red")
    request = turn_request(expanded, [png, png], pad)
    assert request["prompt_token_ids"] == [1, 8, pad, 7, 2, 8, pad, 7, 3]
    assert len(request["multi_modal_data"]["image"]) == 2
    assert turn_request([1, 2], (), None) == {"prompt_token_ids": [1, 2]}
    with pytest.raises(ValueError, match="takes no images"):
        turn_request(expanded, [png], None)


def _png(size, colour) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_a_sampled_placeholder_fails_its_sample_and_an_observations_images_do_not():
    from rlhf_cluster.experience.records import Rollout
    from rlhf_cluster.generation.multimodal import fail_sampled_placeholders

    def rollout(ids, mask=None):
        return Rollout("s", "p", "g", [1, 2], ids, [-0.5] * len(ids), 0, "stop", loss_mask=mask)

    pad = 9
    sampled, observed, clean = rollout([3, pad, 4]), rollout([3, pad, pad, 4], [1, 0, 0, 1]), rollout([3, 4])
    out = fail_sampled_placeholders([sampled, observed, clean], frozenset({pad}))
    assert "sampled 1 image/video placeholder" in out[0].failure
    assert out[1].failure == "" and out[2].failure == ""
