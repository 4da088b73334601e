"""A custom reward function may take, by keyword, the prompt, its source, the row's
`data.columns.extra` columns and its id; a (response, answer) function is called as before."""

from __future__ import annotations

import asyncio
import json
import textwrap
import uuid
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.workers.scoring_calls import ScoringCalls
from rlhf_cluster.config import ConfigError, JobConfig, PromptColumns, load_config
from rlhf_cluster.data.chat_template import apply_chat_template
from rlhf_cluster.data.eval_split import split_by_fraction
from rlhf_cluster.data.prompts import PromptSource, read_prompt_file
from rlhf_cluster.experience.admission import Admission
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.job.preflight import preflight
from rlhf_cluster.scoring.rewards import RewardContext, RuleReward, context_keywords, load_reward_fn, reward_contexts

ROWS = [
    {"id": "a", "question": "2+2=", "answer": "4", "origin": "math", "tests": [{"i": "1", "o": "2"}], "level": 1},
    {"id": "b", "question": "print(1)", "answer": "1", "origin": "code", "tests": [{"i": "", "o": "1"}], "level": 3},
]
COLUMNS = PromptColumns(prompt="question", prompt_id="id", source="origin", extra=["tests", "level"])

USER_MODULE = '''
seen = []

def everything(response, answer, prompt, source, extra):
    seen.append((response, answer, prompt, source, extra))
    return float(extra["level"])

def plain(response, answer):
    return float(response == answer)

def keyword_only(response, answer, *, extra, scale=2.0):
    return scale * len(extra["tests"])

def anything(response, answer, **kwargs):
    seen.append(kwargs)
    return 0.0

def unknown(response, answer, data_source):
    return 0.0
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A reward module written to tmp_path and put on sys.path; a fresh name per test."""
    import importlib

    name = f"context_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


def _write(tmp_path, kind: str, rows=ROWS):
    path = tmp_path / f"prompts.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _rollouts(pairs: list[tuple[str, str]]) -> list[Rollout]:
    return [Rollout(f"s{i}", pid, f"g{pid}", [1], [2], [0.0], 0, "stop", text) for i, (pid, text) in enumerate(pairs)]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_extra_columns_are_read_with_each_prompt(tmp_path, kind):
    prompts = read_prompt_file(_write(tmp_path, kind), COLUMNS)
    assert [(p.prompt_id, p.source, p.extra) for p in prompts] == [
        ("a", "math", {"tests": [{"i": "1", "o": "2"}], "level": 1}),
        ("b", "code", {"tests": [{"i": "", "o": "1"}], "level": 3}),
    ]
    without = read_prompt_file(_write(tmp_path, kind), COLUMNS.model_copy(update={"extra": []}))
    assert all(p.extra == {} for p in without)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_listed_column_the_file_lacks_is_refused_naming_the_file_and_column(tmp_path, kind):
    path = _write(tmp_path, kind)
    with pytest.raises(ValueError, match=rf"prompt file \S*prompts.{kind}: missing column\(s\) \['hidden_tests'\]"):
        read_prompt_file(path, COLUMNS.model_copy(update={"extra": ["tests", "hidden_tests"]}))


def test_preflight_refuses_a_missing_extra_column_and_an_unknown_parameter(tmp_path, user_module):
    data = {"path": str(_write(tmp_path, "jsonl")), "columns": COLUMNS.model_dump() | {"extra": ["nope"]}}
    with pytest.raises(ConfigError, match=r"data.path: prompt file \S*prompts.jsonl: missing column\(s\) \['nope'\]"):
        preflight(JobConfig.model_validate({"data": data}))
    rewards = [{"type": "function", "function": f"{user_module.__name__}:unknown"}]
    with pytest.raises(ConfigError, match=r"scoring.rewards\[0\].function=.*\['data_source'\].*'prompt', 'source'"):
        preflight(JobConfig.model_validate({"data": {**data, "columns": COLUMNS.model_dump()},
                                            "scoring": {"rewards": rewards}}))


def test_a_function_taking_the_context_gets_its_own_rows_values(tmp_path, user_module):
    prompts = read_prompt_file(_write(tmp_path, "parquet"), COLUMNS)
    reward = RuleReward(None, reward_fn=f"{user_module.__name__}:everything")
    out = reward.score(_rollouts([("b", "1"), ("a", "5"), ("b", "x")]), reward_contexts(prompts))
    assert [r for r, _ in out] == [3.0, 1.0, 3.0]
    assert user_module.seen == [
        ("1", "1", "print(1)", "code", {"tests": [{"i": "", "o": "1"}], "level": 3}),
        ("5", "4", "2+2=", "math", {"tests": [{"i": "1", "o": "2"}], "level": 1}),
        ("x", "1", "print(1)", "code", {"tests": [{"i": "", "o": "1"}], "level": 3}),
    ]
    keyword = RuleReward(None, reward_fn=f"{user_module.__name__}:keyword_only")
    assert keyword.keywords == ("extra",)  # `scale` keeps its default
    assert keyword.score(_rollouts([("a", "?")]), reward_contexts(prompts))[0][0] == 2.0


def test_kwargs_gets_everything_and_a_two_argument_function_is_unchanged(tmp_path, user_module):
    prompts = read_prompt_file(_write(tmp_path, "jsonl"), COLUMNS)
    anything = RuleReward(None, reward_fn=f"{user_module.__name__}:anything")
    anything.score(_rollouts([("a", "4")]), reward_contexts(prompts))
    assert user_module.seen == [
        {"prompt": "2+2=", "source": "math", "extra": {"tests": [{"i": "1", "o": "2"}], "level": 1}, "prompt_id": "a"}
    ]
    plain = RuleReward(None, reward_fn=f"{user_module.__name__}:plain")
    assert plain.keywords == ()
    rollouts = _rollouts([("a", "4"), ("b", "2")])
    assert [r for r, _ in plain.score(rollouts, reward_contexts(prompts))] == [1.0, 0.0]
    assert [r for r, _ in plain.score(rollouts, {"a": "4", "b": "2"})] == [1.0, 1.0]  # answers alone, as before
    assert context_keywords(lambda response, answer, source=None: 0.0, "x") == ("source",)


def test_a_required_parameter_that_is_not_offered_is_refused_at_load_naming_it(user_module):
    with pytest.raises(ValueError) as err:
        load_reward_fn(f"{user_module.__name__}:unknown", field="scoring.rewards[0].function")
    message = str(err.value)
    assert "scoring.rewards[0].function=" in message and "['data_source']" in message
    assert "['prompt', 'source', 'extra', 'prompt_id']" in message
    with pytest.raises(ValueError, match="must accept"):
        RuleReward(None, reward_fn=lambda response: 0.0)


def test_the_context_crosses_scoring_calls_and_survives_what_prompts_go_through(tmp_path, user_module):
    """The reward pool gets each prompt's context (joined calls merged); the held-out split,
    a checkpoint's pending prompts and the chat template keep a prompt's extra columns."""
    prompts = read_prompt_file(_write(tmp_path, "jsonl"), COLUMNS)
    reward = RuleReward(None, reward_fn=f"{user_module.__name__}:everything")

    class Pool:
        def __len__(self):
            return 1

        async def call(self, method, rollouts, contexts):
            assert method == "score" and all(isinstance(c, RewardContext) for c in contexts.values())
            return "reward0", reward.score(rollouts, contexts)

    calls = ScoringCalls({"reward": Pool()}, {"reward": 8})
    out = asyncio.run(calls.rewards(_rollouts([("a", "4"), ("b", "1")]), reward_contexts(prompts)))
    assert [r for r, _ in out] == [1.0, 3.0]

    split = split_by_fraction(prompts, 0.5, seed=1)
    assert {p.prompt_id: p.extra for p in split.train + split.held_out} == {p.prompt_id: p.extra for p in prompts}

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    adm = Admission(cfg.train, cfg.generation, PromptSource(prompts, seed=3))
    taken = [adm.admit(0)[1][0] for _ in range(2)]
    again = Admission(cfg.train, cfg.generation, PromptSource(prompts, seed=3))
    again.load_state_dict(json.loads(json.dumps(adm.state_dict())), groups_done=0)
    assert [again.admit(5)[1][0].extra for _ in range(2)] == [p.extra for p in taken]

    class Tokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, chat, tokenize, add_generation_prompt, **kwargs):
            return [1, 2] if tokenize else f"<user>{chat[-1]['content']}"

    templated = apply_chat_template(prompts, Tokenizer())
    assert [(p.text, p.extra) for p in templated] == [(f"<user>{p.text}", p.extra) for p in prompts]
    assert reward_contexts(templated)["a"].prompt == "<user>2+2="
    assert reward_contexts(templated)["b"] == RewardContext("1", "<user>print(1)", "code", prompts[1].extra)


def test_a_resume_under_another_rendering_keeps_the_rows_extra_columns(tmp_path):
    """Left by session 18's review: a pending prompt of a checkpoint whose rendering changed since
    (another chat template) came back without its extra columns and source. It now keeps the
    checkpoint's prompt with its row's source and extra; a row whose answer changed is another prompt."""
    prompts = read_prompt_file(_write(tmp_path, "jsonl"), COLUMNS)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    adm = Admission(cfg.train, cfg.generation, PromptSource(prompts, seed=3))
    taken = [adm.admit(0)[1][0] for _ in range(2)]
    state = json.loads(json.dumps(adm.state_dict()))

    class Tokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, chat, tokenize, add_generation_prompt, **kwargs):
            return [7, 8] if tokenize else f"<system/><user>{chat[-1]['content']}"

    rerendered = apply_chat_template(prompts, Tokenizer())
    again = Admission(cfg.train, cfg.generation, PromptSource(rerendered, seed=3))
    again.load_state_dict(state, groups_done=0)
    back = [again.admit(5)[1][0] for _ in range(2)]
    assert [(p.text, p.token_ids) for p in back] == [(p.text, p.token_ids) for p in taken]  # the checkpoint's
    assert [(p.extra, p.source) for p in back] == [(p.extra, p.source) for p in taken] != [({}, None)] * 2

    changed = [replace(p, answer=p.answer + "0") for p in prompts]
    other = Admission(cfg.train, cfg.generation, PromptSource(changed, seed=3))
    other.load_state_dict(state, groups_done=0)
    assert [(p.answer, p.extra, p.source) for p in (other.admit(5)[1][0] for _ in range(2))] == [
        (p.answer, {}, None) for p in taken
    ]
    # Found in review: rows swapped in the file under the same ids (positional `row-N` ids, no answer
    # column) must not lend a prompt another row's extra columns: the checkpoint keeps their digest.
    swapped = [replace(a, text=b.text, extra=b.extra, source=b.source) for a, b in zip(prompts, prompts[::-1])]
    moved = Admission(cfg.train, cfg.generation, PromptSource(swapped, seed=3))
    moved.load_state_dict(state, groups_done=0)
    assert [(p.text, p.extra, p.source) for p in (moved.admit(5)[1][0] for _ in range(2))] == [
        (p.text, {}, None) for p in taken
    ]


def test_a_function_that_edits_extra_leaves_the_next_samples_alone():
    """Found in review: the copy was shallow, so popping a nested test list emptied it for the group's next samples."""
    from rlhf_cluster.scoring.rewards import RewardContext

    def greedy(response, answer, *, extra):
        return float(len(extra["tests"].pop() if extra["tests"] else ""))

    reward = RuleReward(None, reward_fn=greedy)
    contexts = {"a": RewardContext("1", "1+0=", None, {"tests": ["xy"]})}
    assert [r for r, _ in reward.score(_rollouts([("a", "1"), ("a", "2"), ("a", "3")]), contexts)] == [2.0, 2.0, 2.0]
    assert contexts["a"].extra == {"tests": ["xy"]}


def test_a_resume_under_another_rendering_keeps_a_raw_ground_truth(tmp_path):
    """Found in review: a pending prompt whose text changed since its checkpoint, without source or
    extra columns, came back without its raw ground truth (`answer_value`: a verl function's list)."""
    from rlhf_cluster.data.prompts import Prompt

    prompts = [Prompt(f"p{i}", f"q{i}", str([str(i), "x"]), answer_value=[str(i), "x"]) for i in range(4)]
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    adm = Admission(cfg.train, cfg.generation, PromptSource(prompts, seed=3))
    [adm.admit(0) for _ in range(2)]
    state = json.loads(json.dumps(adm.state_dict()))
    rerendered = [replace(p, text=f"<user>{p.text}") for p in prompts]
    again = Admission(cfg.train, cfg.generation, PromptSource(rerendered, seed=3))
    again.load_state_dict(state, groups_done=0)
    back = [again.admit(5)[1][0] for _ in range(2)]
    assert all(p.answer_value == [p.prompt_id[1:], "x"] and not p.text.startswith("<user>") for p in back)
