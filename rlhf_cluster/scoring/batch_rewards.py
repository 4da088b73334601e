"""Batch reward functions (`scoring.rewards[].batch: true`): one call per scoring call, as TRL
calls its reward functions and verl's BatchRewardManager its `compute_score`. A function written
for verl (it names `solution_strs` and `ground_truths`) has its dicts read as verl reads them
(`score` is the reward: `verl_rewards.verl_value`). A TRL function runs unchanged where it reads
what TRL gives it that this job has: its `completions` and `prompts` are strings for a plain prompt
column, and TRL's conversational form when the prompts come from a messages column
(`data.columns.messages`; below), the same form for every call of the job. None is a failed
sample (TRL: not applicable). Not given: TRL's `trainer_state`, `log_extra` and `log_metric`, and a
dataset column that `data.columns.extra` does not name (a `**kwargs` function indexing one fails).

`RuleReward.score` (rlhf_cluster/scoring/rewards.py) gets the rollouts of one scoring call: one or
more groups (a group's failed rollouts left out; an episode trained per turn: its last turn), or a
held-out evaluation's part of whole prompts (`actors/evaluation.py`);
with `batch: true` the function is called ONCE for them, every argument by keyword and each a list
aligned with the rollouts:

- `completions`: the response texts; `completion_ids`: the response token ids (a list per row);
- `prompts`: the prompt texts as the policy saw them; `prompt_id`: the prompts' ids;
- conversational (TRL's form for a dataset whose prompt column holds chat messages): when the
  prompts come from a messages column, each of `prompts` is instead the row's messages (a list of
  `{role, content}` dicts, as the file gives them: without `data.system_prompt`'s turn and without
  the image parts placed for `data.columns.images`; image parts the messages hold themselves stay,
  as `{type: image}`), and each of `completions` is `[{"role": "assistant", "content": text}]`.
  TRL's rule for a prompt ending in an assistant turn (its content prefixes the completion) has
  no use here: such a row is refused when the file is read. A prompt of such a job without its
  row's messages (a checkpoint's pending prompt whose row changed since) gets its text as one user
  turn (`rewards.reward_contexts`);
- `answer`: the reference answers ("" without an answer column); `source`: `data.columns.source`'s
  values (None without that column);
- in verl's spelling (its BatchRewardManager's `compute_score`, always text): `solution_strs` (= the texts),
  `ground_truths` (= answer), `data_sources` (= source), `extra_infos` (each row's
  `data.columns.extra` columns as one dict);
- each `data.columns.extra` column under its own name (None where a row lacks it; the names above
  win over a column of the same name).

A function with `**kwargs` gets them all; otherwise only the names its signature has (a named
parameter that is not one of the fixed names is read as an extra column, and keeps its default
when no row has that column). A required parameter
that is neither a fixed name nor an extra column is refused when the function is loaded and the
columns are known (preflight), naming it. The function returns a list (or tuple, or 1-d numpy
array) with one item per rollout, each read as a per-sample function's return value (a number or a
dict of components) or `None`: that sample's reward failed. A call that raises, runs past
`timeout_s` or returns anything else (a wrong length, a scalar) fails every sample of the call;
the source's `on_error` then judges each failed sample as it would a per-sample function's.

Ray-free, and no import of rewards.py (it imports this module): the contexts are read by
attribute (`RewardContext`'s) and the call is handed in.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.verl_rewards import verl_extra_info

# What every batch function may take by keyword (besides the extra columns), in TRL's spelling, then verl's.
BATCH_FIXED: tuple[str, ...] = (
    "completions", "prompts", "completion_ids", "answer", "source", "prompt_id",
    "solution_strs", "ground_truths", "data_sources", "extra_infos",
)  # fmt: skip
_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class BatchCallFailed(RuntimeError):
    """A batch call that failed as a whole (a raise, a timeout, a bad return): every sample of it
    failed, and the function's failure bounds count it once (`RuleReward`)."""


class BatchContext(Protocol):
    """What a batch function reads of one prompt (`rewards.RewardContext` has it)."""

    @property
    def answer(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def source(self) -> str | None: ...
    @property
    def extra(self) -> Mapping[str, Any]: ...
    @property
    def answer_value(self) -> Any: ...  # the answer column's own value where it is no string (verl's ground truth)
    @property
    def messages(self) -> tuple[dict, ...] | None: ...  # the messages column's messages (None: a plain prompt)


def batch_keywords(fn: Callable, where: str, columns: Sequence[str] | None = None) -> tuple[str, ...] | None:
    """The names `fn` takes by keyword: None for all (a `**kwargs` function), else those its
    signature names (fixed names, then the others, read as extra columns). `columns`: the job's
    `data.columns.extra` when known: a required parameter that is neither a fixed name nor one of
    them is then a ValueError naming `where`; so is one that can only be passed by position."""
    try:
        params = inspect.signature(fn).parameters
    except ValueError:
        return None  # no introspectable signature (some builtins): offer everything, let the call decide
    positional = [p.name for p in params.values() if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if positional:
        raise ValueError(
            f"{where}: a batch reward function is called by keyword only, but {positional} can only be passed "
            "by position (drop the `/`)"
        )
    named = [p for p in params.values() if p.kind in _BY_KEYWORD]
    hidden = [c for c in columns or () if c in BATCH_FIXED]
    if hidden:
        raise ValueError(
            f"{where}: data.columns.extra lists {hidden}, a name a batch function is given already (the fixed "
            f"arguments {list(BATCH_FIXED)}): it would be hidden; rename the column (or read it through extra_infos)"
        )
    offered = list(BATCH_FIXED) + list(columns or ())
    unknown = [p.name for p in named if p.default is p.empty and p.name not in offered]
    if columns is not None and unknown:
        raise ValueError(
            f"{where}: the batch function requires parameter(s) {unknown}, which a batch reward function is not "
            f"given: it gets, by keyword, lists of any of {offered} (data.columns.extra names the extra columns; "
            "**kwargs: all)"
        )
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    fixed = tuple(n for n in BATCH_FIXED if n in params and params[n].kind in _BY_KEYWORD)
    return fixed + tuple(p.name for p in named if p.name not in BATCH_FIXED)


def batch_arguments(
    rollouts: Sequence[Rollout], contexts: Mapping[str, BatchContext], names: tuple[str, ...] | None
) -> dict[str, list]:
    """The keyword arguments of one batch call: a list per name, aligned with `rollouts`. `names`:
    `batch_keywords`'s (None: all); an extra column is given when a row has it (another row: None),
    so a parameter no row offers keeps its default."""
    rows = [contexts[r.prompt_id] for r in rollouts]
    present = list(dict.fromkeys(k for c in rows for k in c.extra))  # the rows' extra columns, in order
    wanted = BATCH_FIXED + tuple(present) if names is None else names
    # One copy of each row's extra columns, nested lists too, so edits stay in the call (shared by its lists).
    copies = bool(present) and any(n in wanted for n in (*present, "extra_infos"))
    extras = [copy.deepcopy(dict(c.extra)) for c in rows] if copies else [{} for _ in rows]
    # A messages column's job: TRL's conversational form (`reward_contexts` gives every context messages).
    chats = any(c.messages is not None for c in rows)
    fixed: dict[str, Callable[[], list]] = {
        "completions": lambda: [_completion(r.response_text, chats) for r in rollouts],
        "prompts": lambda: [_prompt(c, chats) for c in rows],
        "completion_ids": lambda: [list(r.response_ids) for r in rollouts],
        "answer": lambda: [c.answer for c in rows],
        "source": lambda: [c.source for c in rows],
        "prompt_id": lambda: [r.prompt_id for r in rollouts],
        "solution_strs": lambda: [r.response_text for r in rollouts],
        "ground_truths": lambda: [c.answer if c.answer_value is None else c.answer_value for c in rows],
        "data_sources": lambda: [c.source for c in rows],
        "extra_infos": lambda: [verl_extra_info(x) for x in extras],
    }
    out: dict[str, list] = {name: fixed[name]() for name in wanted if name in fixed}
    for name in present:  # an extra column under its own name
        if name in wanted and name not in fixed:
            out[name] = [x.get(name) for x in extras]
    return out


def _completion(text: str, chats: bool) -> str | list[dict]:
    """One of `completions`: the text, or (conversational) TRL's one assistant message holding it."""
    return [{"role": "assistant", "content": text}] if chats else text


def _prompt(context: BatchContext, chats: bool) -> str | list[dict]:
    """One of `prompts`: the text, or (conversational) the row's messages, its own copy (edits stay
    in the call); a row without messages in such a call: its text as one user turn."""
    if not chats:
        return context.prompt
    if context.messages is None:
        return [{"role": "user", "content": context.prompt}]
    return copy.deepcopy(list(context.messages))


def batch_items(value: object, n: int) -> list[object]:
    """The `n` items of a batch function's return value; a TypeError or ValueError (every sample
    of the call failed) when it is not a list, tuple or 1-d array of `n` items."""
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):  # a 1-d numpy array (or tensor)
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"the batch function returned a {type(value).__name__}, expected a list of {n} rewards (one per response)"
        )
    if len(value) != n:
        raise ValueError(f"the batch function returned {len(value)} rewards for {n} responses")
    return list(value)


def batch_outcomes(
    call: Callable[[dict[str, list]], object],
    rollouts: Sequence[Rollout],
    contexts: Mapping[str, BatchContext],
    names: tuple[str, ...] | None,
) -> list[tuple[object, Exception | None]]:
    """Each rollout's value from ONE `call(keyword arguments)`, or why it failed: the call's error
    (a raise, a timeout, a bad return) for every rollout, or a `None` item's for that one."""
    if not rollouts:
        return []
    try:
        items = batch_items(call(batch_arguments(rollouts, contexts, names)), len(rollouts))
    except Exception as exc:  # every sample of the call failed; `on_error` judges each, the failure counts once
        form = ""
        if isinstance(exc, TypeError) and not any(contexts[r.prompt_id].messages for r in rollouts):
            form = (
                " (its completions and prompts are strings: the prompts come from a plain text column; "
                "data.columns.messages gives TRL's conversational form, [{role, content}] lists)"
            )
        failed = BatchCallFailed(f"the batch call over {len(rollouts)} samples: {type(exc).__name__}: {exc}{form}")
        failed.__cause__ = exc
        return [(None, failed)] * len(rollouts)
    missing = ValueError("the batch function returned None for this sample")
    return [(None, missing) if item is None else (item, None) for item in items]
