"""The model's tool calls and reasoning come back through the gateway as OpenAI fields, read by
the installed vLLM's own parsers (`generation.agent.tool_parser`, `reasoning_parser`): Hermes,
Llama 3 JSON and Mistral on text the test writes, through the real app and the `openai` client;
unknown parser names are refused at preflight with the installed list."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from rlhf_cluster.config import JobConfig
from rlhf_cluster.gateway.replies import ReplyParser, parser_problems, tool_parser_names
from rlhf_cluster.gateway.server import Gateway
from rlhf_cluster.job.preflight import ConfigError, preflight
from test_gateway import TOOLS, ScriptedEngine, client_of, run

# The markers the formats use, special tokens as in the models that write them.
MARKERS = ["<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "<think>", "</think>"]
ARGS = {"expression": "2+3"}
FORMATS = {
    "hermes": f'let me see <tool_call>{{"name": "calculator", "arguments": {json.dumps(ARGS)}}}</tool_call>',
    "llama3_json": f'<|python_tag|>{{"name": "calculator", "parameters": {json.dumps(ARGS)}}}',
    "mistral": f"[TOOL_CALLS]calculator[ARGS]{json.dumps(ARGS)}",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    return tokenizer


@pytest.mark.parametrize("parser", sorted(FORMATS))
def test_each_models_tool_call_format_comes_back_as_openai_tool_calls(tokenizer, parser):
    engine = ScriptedEngine(tokenizer, [FORMATS[parser]])
    gateway = Gateway(tokenizer, engine, "policy", budget=400, max_model_len=4096,
                      replies=ReplyParser(tokenizer, parser))
    gateway.open("e1")

    async def call():
        client = client_of(gateway)
        return await client.chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "what is 2+3?"}], tools=TOOLS)

    reply = run(call())
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "calculator" and json.loads(tool_call.function.arguments) == ARGS
    assert "calculator" not in (choice.message.content or "")  # the call's text left the content
    # The trace keeps the model's exact tokens (markers and EOS included) whatever the parser made of them.
    sampled = tokenizer(FORMATS[parser], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    trace = gateway.episodes["e1"]
    assert trace.response_ids == sampled and all(trace.loss_mask)


def test_without_tools_offered_the_text_is_the_content(tokenizer):
    parser = ReplyParser(tokenizer, "hermes")
    assert parser.message(FORMATS["hermes"], None) == {"role": "assistant", "content": FORMATS["hermes"]}
    broken = '<tool_call>{"name": "calculator", "arguments": {"bad json</tool_call>'
    assert "tool_calls" not in parser.message(broken, TOOLS)


def test_a_reasoning_parser_splits_the_thinking_off(tokenizer):
    parser = ReplyParser(tokenizer, "hermes", "qwen3")
    message = parser.message(f"<think>2 and 3 make 5</think>{FORMATS['hermes']}", TOOLS)
    assert message["reasoning_content"].strip() == "2 and 3 make 5"
    assert message["tool_calls"][0]["function"]["name"] == "calculator"
    assert "<think>" not in (message["content"] or "")


def test_unknown_parsers_are_refused_with_the_installed_list(tmp_path, tiny_model_path):
    assert {"hermes", "llama3_json", "mistral"} <= set(tool_parser_names())
    (problem,) = parser_problems("hermez", None)
    assert "generation.agent.tool_parser: 'hermez'" in problem and "llama3_json" in problem
    cfg = JobConfig.model_validate({
        "model": {"path": tiny_model_path}, "run_dir": str(tmp_path),
        "generation": {"agent": {"function": "os:getcwd", "tool_parser": "hermes", "reasoning_parser": "qwen4"}},
    })
    with pytest.raises(ConfigError, match="generation.agent.reasoning_parser: 'qwen4'.*qwen3"):
        preflight(cfg)
