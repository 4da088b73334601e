"""Images through the agent gateway: `image_url` parts read and checked (a 400 naming the part for
each bad one), the engine given every image of the context, and the episode's trace the context as
the engine saw it (each image expanded to its tokens, masked out) with its images in order. The
engine is a fake that expands placeholders as vLLM does; the tokenizer the tiny VLM's."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.gateway.images import ImagePolicy, agent_messages, decode_data_url, request_images
from rlhf_cluster.gateway.requests import RequestRefused
from rlhf_cluster.gateway.server import Gateway, build_app
from rlhf_cluster.generation.engine_outputs import Turn
from rlhf_cluster.generation.image_turns import ExpansionError, count_placeholders, expansions, grown, shifted
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.models.tiny_vlm import IMAGE_PAD


def png(width: int, height: int = 8, colour: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def user(text: str, *images: bytes) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url(i)}} for i in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def tokenizer(model_cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny_model(TinyModelConfig(architecture="qwen2_5_vl"), model_cache))


def policy_of(tokenizer, **kw) -> ImagePolicy:
    pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    return ImagePolicy(**{"max_images": 4, "image_token_id": pad, "placeholder": IMAGE_PAD, **kw})


class ExpandingEngine:
    """Expands each placeholder as vLLM's processor does (one run per image: its width / 8 tokens
    here), checks it got one image per placeholder, and answers turn k with `replies[k]`."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies = tokenizer, list(replies)
        self.pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.calls: list[tuple[list[int], tuple[bytes, ...]]] = []

    async def __call__(self, context, max_tokens, stop, greedy, images=()):
        sent = [t for k, t in enumerate(context) if t != self.pad or k == 0 or context[k - 1] != self.pad]
        assert count_placeholders(sent, self.pad) == len(images)
        widths = iter(Image.open(io.BytesIO(i)).size[0] // 8 for i in images)
        seen = [u for t in sent for u in ([t] * next(widths) if t == self.pad else [t])]
        self.calls.append((seen, tuple(images)))
        ids = self.tokenizer(self.replies.pop(0), add_special_tokens=False)["input_ids"][:max_tokens]
        turn = Turn(ids, [-0.5] * len(ids), [(0, 2)], "stop", self.tokenizer.decode(ids))
        return (turn, seen) if images else turn


def client_of(gateway: Gateway) -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=build_app(gateway))
    return openai.AsyncOpenAI(
        base_url="http://gateway/episodes/e1/v1",
        api_key="k",
        http_client=httpx.AsyncClient(transport=transport),
        max_retries=0,
    )


def test_image_parts_are_read_and_each_bad_one_refused_naming_it(tokenizer):
    policy = policy_of(tokenizer, max_bytes=2000)
    red, blue = png(16), png(24, colour="blue")
    assert request_images([{"role": "system", "content": "hi"}, user("what?", red, blue)], policy) == [(), (red, blue)]
    cases = {
        "http": (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
            "messages[0].content[0].image_url",
            "image_urls: any",
        ),
        "unreadable": (user("x", b"not a png at all"), "messages[0].content[0].image_url", "not a readable image"),
        "too large": (
            user("x", png(400, 400, "white") + b"\0" * 3000),
            "messages[0].content[0].image_url",
            "over the limit of 2,000",
        ),
        "placeholder": (user(f"look {IMAGE_PAD}"), "messages[0].content[0]", "image placeholder"),
        "audio": (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            "messages[0].content[0].type",
            "not served",
        ),
    }
    for name, (message, where, says) in cases.items():
        with pytest.raises(RequestRefused) as refused:
            request_images([message], policy)
        assert refused.value.status == 400 and refused.value.param == where and says in str(refused.value), name
    with pytest.raises(RequestRefused, match="takes no images"):
        request_images([user("x", red)], ImagePolicy())
    with pytest.raises(RequestRefused, match="5 images; the engine takes at most 4"):
        request_images([user("x", red, red, red), user("y", red, red)], policy)
    fetched = ImagePolicy(1, urls="any", fetch=lambda u, limit: red)  # `any`: fetched (never the network here)
    assert request_images(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://a"}}]}], fetched
    ) == [(red,)]


def test_data_urls_are_size_checked_before_decoding():
    with pytest.raises(ValueError, match="about 7,500 bytes, over the limit of 100"):
        decode_data_url("data:image/png;base64," + "A" * 10_000, 100)
    with pytest.raises(ValueError, match="not a base64 image"):
        decode_data_url("data:text/plain,hello", 100)


def test_a_prompts_images_reach_the_agent_as_data_urls_in_order():
    red, blue = png(16), png(16, colour="blue")
    prompt = Prompt("p", "count", "3", messages=({"role": "user", "content": "how many dots?"},), images=(red, blue))
    [message] = agent_messages(prompt)
    parts = message["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert [decode_data_url(p["image_url"]["url"], 10**6) for p in parts[:2]] == [red, blue]
    assert agent_messages(Prompt("q", "2+2", "4")) == [{"role": "user", "content": "2+2"}]


def test_expansions_grow_a_trace_where_placeholders_became_runs():
    P = 9
    sent, seen = [1, P, 2, P, P, P, 3, P], [1, P, P, 2, P, P, P, 3, P, P, P, P]
    inserts = expansions(sent, seen, P)
    assert inserts == [(2, 1), (8, 3)]  # the second run was expanded already
    assert grown(sent, inserts, P) == seen and grown([0] * 8, inserts, 7) == [0, 0, 7, 0, 0, 0, 0, 0, 0, 7, 7, 7]
    assert shifted(2, inserts) == 3 and shifted(1, inserts) == 1 and shifted(8, inserts) == 12
    assert expansions(sent, sent, None) == []
    for bad in ([1, P, 2, P, P, P, 4, P], [1, P, P, 2, P, P, 3, P], [1, P, 2]):
        with pytest.raises(ExpansionError):
            expansions(sent, bad, P)


def test_an_agent_sending_images_over_two_turns_gets_an_exact_trace_with_its_images(tokenizer):
    engine = ExpandingEngine(tokenizer, ["a red square", "and blue"])
    gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096, images=policy_of(tokenizer))
    gateway.open("e1")
    red, blue = png(16), png(40, colour="blue")  # 2 and 5 image tokens

    async def agent():
        client = client_of(gateway)
        messages = [user("what is this?", red)]
        first = await client.chat.completions.create(model="policy", messages=messages)
        messages += [{"role": "assistant", "content": first.choices[0].message.content}, user("and this?", blue)]
        second = await client.chat.completions.create(model="policy", messages=messages)
        return first, second

    first, second = asyncio.run(agent())
    trace = gateway.close("e1")
    pad = engine.pad
    assert [images for _, images in engine.calls] == [(red,), (red, blue)]  # every image of the context, in order
    assert first.usage.prompt_tokens == len(engine.calls[0][0])  # the image's tokens counted
    # The trace is exactly what the engine saw: the prompt's image as 2 tokens, the later one as 5 (masked out).
    assert trace.prompt_ids == engine.calls[0][0] and trace.prompt_ids.count(pad) == 2
    start0, start1 = trace.turn_starts
    assert engine.calls[1][0] == trace.prompt_ids + trace.response_ids[:start1]
    assert trace.response_ids.count(pad) == 5 and trace.response_ids[start1:] == second.model_extra["rlhf"]["token_ids"]
    turn0 = first.model_extra["rlhf"]["token_ids"]
    assert trace.loss_mask == [1] * len(turn0) + [0] * (start1 - len(turn0)) + [1] * (len(trace.response_ids) - start1)
    assert all((lp == -0.5) == bool(m) for lp, m in zip(trace.logprobs, trace.loss_mask))
    rollout = trace.to_rollout(tokenizer, "p", "g", "g:0", "gen0", 2)
    assert rollout.images == (red, blue) and rollout.turn_starts == [0, start1]


def test_per_turn_samples_keep_each_turns_images_and_refusals_leave_the_episode_usable(tokenizer):
    engine = ExpandingEngine(tokenizer, ["one", "two"])
    gateway = Gateway(
        tokenizer, engine, "policy", budget=400, max_model_len=4096, images=policy_of(tokenizer), samples="turn"
    )
    gateway.open("e1")
    red, blue = png(16), png(24, colour="blue")

    async def agent():
        client = client_of(gateway)
        await client.chat.completions.create(model="policy", messages=[user("this?", red)])
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\].content\[0\].image_url.*not a readable"):
            await client.chat.completions.create(model="policy", messages=[user("bad", b"\x89PNG broken")])
        await client.chat.completions.create(model="policy", messages=[user("now these", blue, red)])

    asyncio.run(agent())
    trace = gateway.close("e1")
    rollouts = trace.to_rollouts(tokenizer, "p", "g", "g:0", "gen0", 2)
    assert [r.images for r in rollouts] == [(red,), (blue, red)]
    assert [r.prompt_ids for r in rollouts] == [seen for seen, _ in engine.calls]
    assert [r.prompt_ids.count(engine.pad) for r in rollouts] == [2, 3 + 2]
    assert gateway.stats.refused == {"400": 1}
