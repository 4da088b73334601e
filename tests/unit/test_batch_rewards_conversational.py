"""`batch: true` over a conversational dataset (`data.columns.messages`): a batch function gets
TRL's conversational form (`prompts` the rows' messages, `completions` one assistant message each),
so TRL's GSM8K GRPO reward function runs unchanged; a plain prompt column still gives strings."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_cluster.config import PromptColumns
from rlhf_cluster.data.chat_template import apply_chat_template
from rlhf_cluster.data.prompts import Prompt, read_prompt_file
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.rewards import FAILED, RewardContext, RewardFunctionError, RuleReward, reward_contexts

QUESTIONS = {"a": "Tom has 3 apples and buys 4. How many?", "b": "What is 6 times 7?"}
ROWS = [
    {
        "id": pid,
        "prompt": [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": question}],
        "question": question,
        "answer": answer,
    }
    for (pid, question), answer in zip(QUESTIONS.items(), ["7", "42"])
]
SYSTEM = "You are a careful solver."  # data.system_prompt: the dataset's messages already open with a system turn


class Tokenizer:
    """A chat template that shows which turns it was given."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, chat, tokenize, add_generation_prompt, **kwargs):
        text = "".join(f"<{m['role']}>{m['content']}" for m in chat) + "<assistant>"
        return [1] * len(chat) if tokenize else text


def _file(tmp_path) -> str:
    path = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    return str(path)


def _rollouts(texts: list[tuple[str, str]]) -> list[Rollout]:
    return [Rollout(f"s{i}", pid, f"g{pid}", [1], [5], [0.0], 0, "stop", text) for i, (pid, text) in enumerate(texts)]


ANSWERS = [("a", "7"), ("a", " 8"), ("b", "42\n"), ("b", "6*7")]


def correctness(prompts, completions, answer, **kwargs):
    """TRL's GSM8K GRPO example, as it is copied: message lists in, one reward per completion out."""
    questions.append(prompts[0][-1]["content"])
    prompts[0][-1]["content"] = "edited"  # the call's own copy: the prompt stays as it is
    return [2.0 if c[0]["content"].strip() == a else 0.0 for c, a in zip(completions, answer)]


questions: list[str] = []


def test_trls_gsm8k_reward_function_runs_unchanged_on_a_messages_column_file(tmp_path):
    prompts = read_prompt_file(_file(tmp_path), PromptColumns(messages="prompt", prompt_id="id"))
    templated = apply_chat_template(prompts, Tokenizer(), SYSTEM)
    contexts = reward_contexts(templated)
    questions.clear()
    out = RuleReward(None, reward_fn=correctness, batch=True).score(_rollouts(ANSWERS), contexts)
    assert out == [(2.0, {FAILED: 0.0}), (0.0, {FAILED: 0.0}), (2.0, {FAILED: 0.0}), (0.0, {FAILED: 0.0})]
    assert questions == [QUESTIONS["a"]]
    assert contexts["a"].messages == tuple(ROWS[0]["prompt"])  # unedited; the file's own messages
    # Again, now looking at every argument: the file's messages (no data.system_prompt turn added,
    # though the policy saw one), one assistant message per completion; verl's names stay text.
    seen: dict = {}

    def record(**kwargs):
        seen.update(kwargs)
        return [0.0] * len(kwargs["completions"])

    RuleReward(None, reward_fn=record, batch=True).score(_rollouts(ANSWERS), contexts)
    assert seen["prompts"] == [ROWS[0]["prompt"]] * 2 + [ROWS[1]["prompt"]] * 2
    assert seen["completions"] == [[{"role": "assistant", "content": t}] for _, t in ANSWERS]
    assert seen["solution_strs"] == [t for _, t in ANSWERS] and seen["answer"] == ["7", "7", "42", "42"]
    assert all(p.text.startswith("<system>Answer with a number.<user>") for p in templated)


def test_a_plain_prompt_column_still_gives_strings_though_the_chat_template_sets_messages(tmp_path):
    prompts = read_prompt_file(_file(tmp_path), PromptColumns(prompt="question", prompt_id="id"))
    templated = apply_chat_template(prompts, Tokenizer(), SYSTEM)
    assert all(p.messages for p in templated)  # the rendered chat: not what decides the form
    seen: dict = {}

    def accuracy(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    out = RuleReward(None, reward_fn=accuracy, batch=True).score(_rollouts(ANSWERS), reward_contexts(templated))
    assert [r for r, _ in out] == [1.0, 0.0, 1.0, 0.0]
    assert seen["completions"] == [t for _, t in ANSWERS]
    assert (
        seen["prompts"]
        == [f"<system>{SYSTEM}<user>{QUESTIONS['a']}<assistant>"] * 2
        + [f"<system>{SYSTEM}<user>{QUESTIONS['b']}<assistant>"] * 2
    )
    # TRL's conversational function cannot read these: every sample of its call fails (on_error: drop).
    failed = RuleReward(None, reward_fn=correctness, batch=True).score(_rollouts(ANSWERS), reward_contexts(templated))
    assert failed == [(0.0, {FAILED: 1.0})] * 4
    # ...and its error says why (found trying it as a TRL user would: a TypeError alone sent them looking).
    with pytest.raises(RewardFunctionError, match=r"string indices.*strings: the prompts come from a plain text "
                                                  r"column; data.columns.messages gives TRL's conversational form"):
        RuleReward(None, reward_fn=correctness, batch=True, on_error="fail").score(
            _rollouts(ANSWERS), reward_contexts(templated))


def test_image_parts_placed_for_an_images_column_are_not_in_the_prompts():
    chat = ({"role": "user", "content": "What is shown?"},)
    prompt = Prompt("p", "", "cat", messages=chat, images=(b"png",), conversation=chat)
    (templated,) = apply_chat_template([prompt], Tokenizer())
    assert templated.messages[0]["content"][0] == {"type": "image"}  # what the policy saw
    assert reward_contexts([templated])["p"].messages == chat  # what a batch function gets


def test_a_row_without_messages_in_a_conversational_call_gets_its_text_as_one_user_turn():
    contexts = {
        "a": RewardContext("7", "<user>q<assistant>", messages=({"role": "user", "content": "q"},)),
        "b": RewardContext("1", "<user>r<assistant>"),  # e.g. a resumed prompt whose rendering changed
    }
    seen: dict = {}

    def record(prompts, completions):
        seen.update(prompts=prompts, completions=completions)
        return [1.0] * len(prompts)

    RuleReward(None, reward_fn=record, batch=True).score(_rollouts([("a", "x"), ("b", "y")]), contexts)
    assert seen["prompts"] == [[{"role": "user", "content": "q"}], [{"role": "user", "content": "<user>r<assistant>"}]]
    assert seen["completions"] == [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]]


def test_a_conversational_jobs_prompt_without_its_messages_still_gets_the_conversational_form():
    """Found in review: the form was decided per call, so a call of only such prompts (a resume's
    pending prompts come first) gave TRL's function strings and failed every sample. The job's
    config decides it now (`reward_contexts(..., conversational=True)`: `data.columns.messages`)."""
    pending = Prompt("b", "<user>r<assistant>", "1")  # a checkpoint's prompt whose row changed since
    contexts = reward_contexts([pending], conversational=True)
    assert contexts["b"].messages == ({"role": "user", "content": "<user>r<assistant>"},)
    assert RuleReward(None, reward_fn=correctness, batch=True).score(_rollouts([("b", "1")]), contexts)[0][0] == 2.0
    assert reward_contexts([pending])["b"].messages is None  # a plain prompt column's job: strings


def test_a_resume_under_another_rendering_keeps_the_rows_own_messages(tmp_path):
    """A checkpoint's pending prompt whose rendering changed since (another chat template) but whose
    row did not keeps the row's messages, as it keeps its extra columns."""
    import json

    from rlhf_cluster.config import load_config
    from rlhf_cluster.data.prompts import PromptSource
    from rlhf_cluster.experience.admission import Admission

    prompts = read_prompt_file(_file(tmp_path), PromptColumns(messages="prompt", answer="answer", prompt_id="id"))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    adm = Admission(cfg.train, cfg.generation, PromptSource(apply_chat_template(prompts, Tokenizer()), seed=3))
    taken = [adm.admit(0)[1][0] for _ in range(2)]
    state = json.loads(json.dumps(adm.state_dict()))
    class Another(Tokenizer):
        def apply_chat_template(self, chat, tokenize, add_generation_prompt, **kwargs):
            return [2] * len(chat) if tokenize else "<bos>" + super().apply_chat_template(chat, False, True)

    again = Admission(cfg.train, cfg.generation, PromptSource(apply_chat_template(prompts, Another()), seed=3))
    again.load_state_dict(state, groups_done=0)
    back = [again.admit(5)[1][0] for _ in range(2)]
    assert [p.text for p in back] == [p.text for p in taken]  # the checkpoint's rendering
    assert [p.conversation for p in back] == [p.conversation for p in taken] and all(p.conversation for p in back)
