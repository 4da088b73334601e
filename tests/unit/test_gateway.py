"""The agent gateway's pure parts over a real tokenizer and the real FastAPI app: an `openai`
client drives it (through httpx's ASGI transport) against a scripted engine, and each episode's
trace is the exact token context the engine saw, model turns masked in, everything else out."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from rlhf_cluster.gateway.chat import continuation_text, render
from rlhf_cluster.gateway.server import Gateway, build_app
from rlhf_cluster.generation.engine_outputs import Turn

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


class ScriptedEngine:
    """Answers turn k with `replies[k]` (EOS appended), log-prob -0.5 per token, weight version 3;
    records every context it was given."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer, self.replies, self.contexts = tokenizer, list(replies), []

    async def __call__(self, context, max_tokens, stop, greedy) -> Turn:
        self.contexts.append(list(context))
        ids = (self.tokenizer(self.replies.pop(0), add_special_tokens=False)["input_ids"]
               + [self.tokenizer.eos_token_id])[:max_tokens]
        return Turn(ids, [-0.5] * len(ids), [(0, 3)], "stop" if len(ids) < max_tokens else "length",
                    self.tokenizer.decode(ids, skip_special_tokens=True))


def client_of(gateway: Gateway, episode: str | None = "e1", key: str = "k") -> openai.AsyncOpenAI:
    base = f"http://gateway/episodes/{episode}/v1" if episode else "http://gateway/v1"
    transport = httpx.ASGITransport(app=build_app(gateway))
    return openai.AsyncOpenAI(base_url=base, api_key=key, http_client=httpx.AsyncClient(transport=transport), max_retries=0)


def run(coro):
    return asyncio.run(coro)


def test_a_tool_loop_through_the_openai_client_is_one_exact_token_context(tokenizer):
    engine = ScriptedEngine(tokenizer, [f"let me compute {CALL}", "the answer is 5"])
    gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096)
    gateway.open("e1")
    messages = [{"role": "system", "content": "use tools"}, {"role": "user", "content": "what is 2+3?"}]

    async def agent():
        client = client_of(gateway)
        first = await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
        call = first.choices[0].message.tool_calls[0]
        assert first.choices[0].finish_reason == "tool_calls"
        assert (call.function.name, json.loads(call.function.arguments)) == ("calculator", {"expression": "2+3"})
        assert first.choices[0].message.content == "let me compute"
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "5"})
        second = await client.chat.completions.create(model="policy", messages=messages, tools=TOOLS)
        messages.append(second.choices[0].message.model_dump(exclude_none=True))
        return first, second

    first, second = run(agent())
    trace = gateway.close("e1")
    # What the engine saw second is exactly the first context, the first turn, then the appended tokens.
    assert engine.contexts[1][: len(engine.contexts[0])] == engine.contexts[0]
    assert engine.contexts[1] == trace.prompt_ids + trace.response_ids[: trace.turn_starts[1]]
    # The trace is the whole conversation as the template renders it, token for token in model turns.
    # (The first reply as the model wrote it: the agent got its call parsed out of the text.)
    as_written = messages[:2] + [{"role": "assistant", "content": f"let me compute {CALL}"}] + messages[3:]
    whole = tokenizer.decode(trace.prompt_ids + trace.response_ids, skip_special_tokens=False)
    assert whole == render(tokenizer, as_written, TOOLS, generation_prompt=False)
    first_ids, second_ids = first.model_extra["rlhf"]["token_ids"], second.model_extra["rlhf"]["token_ids"]
    start0, start1 = trace.turn_starts
    assert trace.response_ids[start0:start0 + len(first_ids)] == first_ids
    assert trace.response_ids[start1:] == second_ids
    assert trace.loss_mask == [1] * len(first_ids) + [0] * (start1 - len(first_ids)) + [1] * len(second_ids)
    assert all((lp == -0.5) == bool(m) for lp, m in zip(trace.logprobs, trace.loss_mask))
    assert trace.rewrites == 0
    rollout = trace.to_rollout(tokenizer, "p", "g", "g:0", "gen0", 3)
    assert rollout.turn_starts == [0, start1] and rollout.policy_versions == [(0, 3)]


def _strip_think_agent(gateway, episode="e1"):
    """An agent that strips the <think> block from the model's earlier reply before going on."""

    async def agent():
        client = client_of(gateway, episode)
        messages = [{"role": "user", "content": "2+3?"}]
        first = await client.chat.completions.create(model="policy", messages=messages)
        messages.append({"role": "assistant", "content": first.choices[0].message.content.split("</think>")[-1].strip()})
        messages.append({"role": "user", "content": "sure?"})
        second = await client.chat.completions.create(model="policy", messages=messages)
        return messages, [first, second]

    return run(agent())


def test_a_rewritten_history_trains_each_turn_on_the_context_the_engine_saw(tokenizer):
    """`samples: auto` (the default): the edit makes the episode per-turn; the engine sees the
    agent's messages as sent, and each model turn becomes a sample of exactly that context and its
    own tokens and log-probs."""
    engine = ScriptedEngine(tokenizer, ["<think>hmm</think> 5", "done"])
    gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096)
    gateway.open("e1")
    messages, replies = _strip_think_agent(gateway)
    trace = gateway.close("e1")
    assert trace.rewrites == 1 and trace.per_turn
    assert "<think>hmm</think>" in tokenizer.decode(engine.contexts[0] + replies[0].model_extra["rlhf"]["token_ids"])
    assert "<think>" not in tokenizer.decode(engine.contexts[1])  # the edit is what the model now sees
    assert tokenizer.decode(engine.contexts[1]) == render(tokenizer, messages, None, generation_prompt=True)
    trace.rewards.append(1.0)
    rollouts = trace.to_rollouts(tokenizer, "p", "g", "g:0", "gen0", 3)
    assert [r.sample_id for r in rollouts] == ["g:0:t0", "g:0:t1"] and {r.episode_id for r in rollouts} == {"g:0"}
    for r, context, reply in zip(rollouts, engine.contexts, replies):
        assert r.prompt_ids == context and r.response_ids == reply.model_extra["rlhf"]["token_ids"]
        assert r.rollout_logprobs == [-0.5] * len(r.response_ids) and r.policy_versions == [(0, 3)]
        assert r.turn_rewards == [1.0]  # the agent's reward is the episode's, on every turn


def test_an_episode_sampled_as_one_sequence_refuses_a_rewrite_naming_the_setting(tokenizer):
    engine = ScriptedEngine(tokenizer, ["<think>hmm</think> 5", "done"])
    gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096, samples="episode")
    gateway.open("e1")
    with pytest.raises(openai.ConflictError, match="samples: episode"):
        _strip_think_agent(gateway)
    assert len(engine.contexts) == 1 and gateway.stats.refused == {"409": 1}


def test_turn_samples_render_every_request_afresh_even_without_a_rewrite(tokenizer):
    engine = ScriptedEngine(tokenizer, ["a", "b"])
    gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096, samples="turn")
    gateway.open("e1")

    async def agent():
        client = client_of(gateway)
        messages = [{"role": "user", "content": "x"}]
        first = await client.chat.completions.create(model="policy", messages=messages)
        messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "y"}]
        await client.chat.completions.create(model="policy", messages=messages)
        return messages

    messages = run(agent())
    trace = gateway.close("e1")
    assert trace.per_turn and trace.rewrites == 0
    assert tokenizer.decode(engine.contexts[1]) == render(tokenizer, messages, None, generation_prompt=True)
    assert len(trace.to_rollouts(tokenizer, "p", "g", "g:0", "gen0", 0)) == 2


def test_dropped_history_unknown_episodes_and_missing_tokens_are_refused(tokenizer):
    engine = ScriptedEngine(tokenizer, ["a", "b", "c"])
    gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096, token="secret", samples="episode")
    gateway.open("e1")

    async def calls():
        ok = client_of(gateway, key="secret")
        with pytest.raises(openai.AuthenticationError, match="generation.agent.token, or the standalone gateway's --token"):
            await client_of(gateway, key="wrong").chat.completions.create(model="policy", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.NotFoundError, match="not open"):
            await client_of(gateway, "nope", key="secret").chat.completions.create(
                model="policy", messages=[{"role": "user", "content": "x"}])
        await ok.chat.completions.create(model="policy", messages=[{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])
        with pytest.raises(openai.ConflictError, match="do not extend"):
            await ok.chat.completions.create(model="policy", messages=[{"role": "user", "content": "y"}])
        untagged = await client_of(gateway, None, key="secret").chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "x"}])
        assert untagged.choices[0].message.content == "b"
        models = await ok.models.list()
        assert [m.id for m in models.data] == ["policy"]

    run(calls())
    assert gateway.stats.refused == {"401": 1, "404": 1, "409": 1} and gateway.stats.untagged == 1


def test_streaming_and_completions_and_the_token_budget(tokenizer):
    engine = ScriptedEngine(tokenizer, ["12345678", "1", "1", "more"])
    gateway = Gateway(tokenizer, engine, "policy", budget=10, max_model_len=4096, open_on_first_use=True)

    async def calls():
        client = client_of(gateway, "s1")
        stream = await client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "12345678"
        # Asked for, the stream ends with the usage (trial 23b G2: an agent counting tokens got none).
        counted = await client_of(gateway, "s2").chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "x"}], stream=True,
            stream_options={"include_usage": True})  # fmt: skip
        chunks = [c async for c in counted]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2, chunks[-1]  # "1" and EOS
        assert all(c.usage is None for c in chunks[:-1]) and chunks[0].choices[0].delta.content == "1"
        done = await client_of(gateway, "c1").completions.create(model="policy", prompt="1+1=")
        assert done.choices[0].text == "1"
        later = await client_of(gateway, "c1").completions.create(model="policy", prompt="1+1=1 and 2+2=")
        return later

    later = run(calls())
    c1 = gateway.episodes["c1"]
    # The model's "1" and EOS, then the prompt's new text cut at the episode's 10-token budget: nothing left to sample.
    assert "1+1=1 and 2+2=".startswith(tokenizer.decode(c1.prompt_ids + c1.response_ids, skip_special_tokens=True))
    assert len(c1.response_ids) == 10 and c1.loss_mask[:2] == [1, 1] and not any(c1.loss_mask[2:])
    assert later.choices[0].finish_reason == "length" and len(engine.contexts) == 3


def test_the_continuation_finishes_the_assistant_turn_the_model_left_open(tokenizer):
    added = [{"role": "user", "content": "next"}]
    closed = continuation_text(tokenizer, "5" + tokenizer.eos_token, added, None)
    cut = continuation_text(tokenizer, "5", added, None)  # stopped by length: the template's turn end is added
    assert cut == tokenizer.eos_token + closed


def test_a_completions_prompt_that_drops_earlier_text_goes_per_turn_or_is_refused(tokenizer):
    for samples in ("auto", "episode"):
        engine = ScriptedEngine(tokenizer, ["12", "34"])
        gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096, samples=samples)
        gateway.open("e1")

        async def agent():
            client = client_of(gateway)
            first = await client.completions.create(model="policy", prompt="1+2=")
            second_prompt = "summary: " + first.choices[0].text  # the earlier text is not repeated
            return await client.completions.create(model="policy", prompt=second_prompt)

        if samples == "episode":
            with pytest.raises(openai.ConflictError, match="samples: episode"):
                run(agent())
            continue
        run(agent())
        trace = gateway.close("e1")
        assert trace.per_turn and trace.rewrites == 1
        assert engine.contexts[1] == tokenizer("summary: 12")["input_ids"]
        first, second = trace.to_rollouts(tokenizer, "p", "g", "g:0", "gen0", 0)
        assert (first.prompt_ids, second.prompt_ids) == (engine.contexts[0], engine.contexts[1])


def test_the_standalone_gateway_says_it_serves_the_model_before_a_warm_up(model_cache, tmp_path, monkeypatch):
    """Trial 23b G1: `rlhf-cluster gateway configs/demo.yaml` served the built-in model as built, while
    a job of that config trains from its supervised warm-up: said, where the config has one."""
    from typer.testing import CliRunner

    from actors.commands.cli import app
    from rlhf_cluster.gateway import standalone

    served = []
    monkeypatch.setattr(standalone, "serve", lambda cfg, model, *args, **kwargs: served.append(model))
    args = ["gateway", "--set", f"model.cache_dir={model_cache}", "--set", f"run_dir={tmp_path}/run"]
    warmed = CliRunner().invoke(app, [*args, "--set", "model.sft_warmup_steps=100"])
    assert warmed.exit_code == 0, warmed.output
    assert "warning: the gateway serves the base model; a job of this config starts from its supervised warm-up" in (
        warmed.output
    )
    plain = CliRunner().invoke(app, [*args, "--set", "model.sft_warmup_steps=0"])
    assert plain.exit_code == 0 and "warm-up" not in plain.output and len(served) == 2
