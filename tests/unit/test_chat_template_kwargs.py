"""`data.chat_template_kwargs`: extra variables for the model's chat template (Qwen3's
`enable_thinking`), as veRL's `data.apply_chat_template_kwargs`, TRL's `chat_template_kwargs`,
SkyRL's `generator.chat_template_kwargs` and slime's `--apply-chat-template-kwargs` pass them:
the prompts the engine receives are rendered with them; one the template does not read is refused."""

from __future__ import annotations

import json

import pytest

from rlhf_cluster.config import JobConfig
from rlhf_cluster.data.chat_template import apply_chat_template
from rlhf_cluster.data.prompts import Prompt
from tests.byo import CHATML, save_chat_model

# ChatML whose generation prompt closes an empty think block when `enable_thinking` is false (Qwen3's way).
THINKING = CHATML.replace(
    "{{ '<|im_start|>assistant\n' }}",
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}",
)


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = save_chat_model(tmp_path_factory.mktemp("thinking"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = THINKING
    tokenizer.save_pretrained(folder)
    return folder


def _inputs(tmp_path, model, **data):
    from rlhf_cluster.job.inputs import prepare_inputs
    from rlhf_cluster.run.run_dir import RunDir

    tmp_path.mkdir()
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {n}+1?", "answer": str(n + 1)}) + "\n" for n in range(4)))
    cfg = JobConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "model": {"path": str(model)},
        "data": {"path": str(path), "chat_template": True, **data},
        "generation": {"probe": {"sequences": 0}},
    })  # fmt: skip
    return prepare_inputs(cfg, RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir))


def test_the_job_prompts_are_rendered_with_the_kwargs(tmp_path, thinking_model):
    from transformers import AutoTokenizer

    plain = _inputs(tmp_path / "plain", thinking_model)
    off = _inputs(tmp_path / "off", thinking_model, chat_template_kwargs={"enable_thinking": False})
    on = _inputs(tmp_path / "on", thinking_model, chat_template_kwargs={"enable_thinking": True})
    closed = AutoTokenizer.from_pretrained(thinking_model).encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    for a, b in zip(plain.prompts, off.prompts):
        assert b.text == a.text + "<think>\n\n</think>\n\n"
        assert b.token_ids == a.token_ids + tuple(closed)  # what the engine receives
    assert [p.token_ids for p in on.prompts] == [p.token_ids for p in plain.prompts]


def test_a_kwarg_the_template_does_not_read_is_refused_by_name(thinking_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(thinking_model)
    prompts = [Prompt("p0", "What is 1+1?", "2")]
    with pytest.raises(ValueError, match="^data.chat_template_kwargs: enable_thinkin is not a variable"):
        apply_chat_template(prompts, tokenizer, None, {"enable_thinkin": False})
    with pytest.raises(ValueError, match="^data.chat_template_kwargs: tokenize is not"):  # apply_chat_template's own
        apply_chat_template(prompts, tokenizer, None, {"tokenize": False, "enable_thinking": False})
    assert apply_chat_template(prompts, tokenizer, None, {}) == apply_chat_template(prompts, tokenizer)


def test_kwargs_without_the_chat_template_are_refused():
    with pytest.raises(ValueError, match="data.chat_template_kwargs .*set data.chat_template: true"):
        JobConfig.model_validate({"data": {"chat_template_kwargs": {"enable_thinking": False}}})


def test_the_dry_runs_first_prompt_is_rendered_as_the_job_renders_it(tmp_path, thinking_model):
    """`--dry-run` shows the first prompt: with the kwargs, as the job's prompts are (it showed it without)."""
    from transformers import AutoTokenizer

    from rlhf_cluster.job.preview import first_prompt

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1+1?", "answer": "2"}) + "\n")
    cfg = JobConfig.model_validate({
        "model": {"path": str(thinking_model)},
        "data": {"path": str(path), "chat_template": True, "chat_template_kwargs": {"enable_thinking": False}},
    })  # fmt: skip
    shown = first_prompt(cfg, AutoTokenizer.from_pretrained(thinking_model))
    assert shown.text.endswith("<think>\n\n</think>\n\n")


def test_extra_columns_without_a_prompt_file_are_refused():
    with pytest.raises(ValueError, match=r"data.columns.extra: \['tests'\] names columns of the prompt file"):
        JobConfig.model_validate({"data": {"columns": {"extra": ["tests"]}}})


def test_kwargs_with_an_agent_are_refused_not_ignored():
    """Found in review: the agent gateway renders each episode with the template's defaults, so the kwargs
    would have shaped the length checks and the rewards' prompts but not what the policy saw."""
    from rlhf_cluster.job.preflight import ConfigError, preflight

    cfg = JobConfig.model_validate({
        "data": {"chat_template": True, "chat_template_kwargs": {"enable_thinking": False}},
        "generation": {"agent": {"function": "tests.integration.misbehaving_agent:always_raises"}},
    })  # fmt: skip
    with pytest.raises(ConfigError, match="data.chat_template_kwargs: .* would not reach the agent gateway"):
        preflight(cfg, files=False)
