"""The built-in tiny model has no chat template of its own; the job renders its chats (a messages
column, `data.chat_template`) with the stand-in template supervised fine-tuning renders it with,
so the embedded default runs chat data and a model fine-tuned here sees the same format in RL. A
user's model without a template is still refused, naming the setting. A real tokenizer saved to disk."""

from __future__ import annotations

import pytest

from rlhf_cluster.data.chat_template import apply_chat_template, chat_tokenizer
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.data.sft import tokenize_conversation
from rlhf_cluster.models.tiny_model import build_tokenizer

CHAT = ({"role": "user", "content": "3+4="},)


def test_the_built_in_model_renders_chats_as_fine_tuning_does(tmp_path):
    build_tokenizer(256, tmp_path)
    tokenizer = chat_tokenizer(tmp_path, built_in=True)
    [prompt] = apply_chat_template([Prompt("p", "3+4=", "7", messages=CHAT)], tokenizer)
    assert prompt.text == "user: 3+4=\nassistant: "
    assert list(prompt.token_ids) == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    # Fine-tuning's rendering of the same chat with its answer starts with the prompt RL gives the engine.
    sft = tokenize_conversation(tokenizer, [*CHAT, {"role": "assistant", "content": "7"}])
    assert sft.input_ids[: len(prompt.token_ids)] == list(prompt.token_ids)


def test_a_users_model_without_a_template_is_still_refused(tmp_path):
    build_tokenizer(256, tmp_path)
    with pytest.raises(ValueError, match="data.chat_template: the model's tokenizer has no chat template"):
        apply_chat_template([Prompt("p", "3+4=", "7", messages=CHAT)], chat_tokenizer(tmp_path, built_in=False))


def test_an_agent_job_on_the_built_in_text_model_is_refused_the_stand_in():
    """The agent gateway renders episodes with its own template, not the stand-in: the two would mix."""
    from rlhf_cluster.config import load_config
    from rlhf_cluster.job.agents import rules

    agent = "generation.agent={function: 'tests.integration.calculator_agent:run'}"
    assert any("stand-in template" in p for p in rules(load_config(None, [agent, "data.chat_template=true"])))
    assert not any("stand-in" in p for p in rules(load_config(None, [agent])))
