"""The gateway refuses what an OpenAI endpoint refuses, in OpenAI's error shape, before anything
is sampled: a model it does not serve, message content that is neither a string nor content
parts, a tool without a function name (driven by the `openai` client, as an agent drives it)."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from rlhf_cluster.gateway.server import Gateway
from test_gateway import TOOLS, ScriptedEngine, client_of, run

USER = [{"role": "user", "content": "what is 2+3?"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.mark.parametrize("request_args,error,field", [
    ({"model": "gpt-4", "messages": USER}, openai.NotFoundError, "The model `gpt-4` does not exist"),
    ({"model": "policy", "messages": [{"role": "user", "content": 5}]}, openai.BadRequestError, "messages[0].content"),
    ({"model": "policy", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, openai.BadRequestError,
     "messages[0].content[0].text"),
    ({"model": "policy", "messages": [{"role": "tool", "content": "5"}]}, openai.BadRequestError,
     "messages[0].tool_call_id"),
    ({"model": "policy", "messages": [{"role": "wizard", "content": "hi"}]}, openai.BadRequestError,
     "messages[0].role"),
    ({"model": "policy", "messages": USER, "tools": [{"type": "function", "function": {"parameters": {}}}]},
     openai.BadRequestError, "tools[0].function.name"),
], ids=["unknown model", "integer content", "part without text", "tool reply without id", "unknown role",
        "tool without name"])
def test_what_openai_refuses_is_refused_before_sampling(tokenizer, request_args, error, field):
    engine = ScriptedEngine(tokenizer, ["5"])
    gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096)
    gateway.open("e1")

    async def call():
        return await client_of(gateway).chat.completions.create(**request_args)

    with pytest.raises(error) as refused:
        run(call())
    assert field in refused.value.message, refused.value.message
    body = refused.value.body  # OpenAI's error shape
    assert body["type"] == "invalid_request_error"
    if error is openai.NotFoundError:
        assert body["param"] == "model" and body["code"] == "model_not_found"
    else:
        assert body["param"] == field
    assert engine.contexts == [] and not gateway.episodes["e1"].response_ids  # nothing sampled, nothing recorded


def test_what_openai_accepts_is_served(tokenizer):
    engine = ScriptedEngine(tokenizer, ["5", "6"])
    gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096)
    gateway.open("e1")
    parts = [{"role": "user", "content": [{"type": "text", "text": "what is 2+3?"}]}]
    no_parameters = [{"type": "function", "function": {"name": "now"}}]  # OpenAI: an empty parameter list

    async def calls():
        client = client_of(gateway)
        first = await client.chat.completions.create(model="policy", messages=parts, tools=TOOLS)
        reply = first.choices[0].message.model_dump(exclude_none=True)
        return await client.chat.completions.create(
            model="policy", messages=parts + [reply, {"role": "user", "content": "and 3+3?"}], tools=no_parameters)

    assert run(calls()).choices[0].message.content == "6"
