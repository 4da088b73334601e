"""A reward function written for verl, called as verl calls it: `compute_score(data_source,
solution_str, ground_truth, extra_info=None)` once per response, by keyword. A function whose
parameters name `solution_str` and `ground_truth` is one (`verl_style`); it gets

- `solution_str`: the response text; `ground_truth`: the answer (`data.columns.answer`, e.g.
  `reward_model.ground_truth`); `data_source`: the source (`data.columns.source`);
- `extra_info`: the row's `extra_info` column when `data.columns.extra` lists it, else the dict of
  the listed extra columns;

each only if its signature takes it (`**kwargs`: all). It returns a number, or a dict whose
`score` is the reward, as verl reads it: its other entries are recorded as components where they
are numbers (a bool as 0/1), left out where they are not (verl's `pred` string)."""

from __future__ import annotations

import copy
import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any

VERL_NAMES = ("data_source", "solution_str", "ground_truth", "extra_info")


def verl_style(fn: Callable) -> bool:
    """Whether `fn` takes verl's per-sample arguments (it names `solution_str` and `ground_truth`)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "solution_str" in params and "ground_truth" in params


def verl_arguments(
    fn: Callable, response: str, answer: str, source: str | None, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The keyword arguments of one call of the verl-style `fn`, those its signature takes."""
    params = inspect.signature(fn).parameters
    given = {
        "data_source": source,
        "solution_str": response,
        "ground_truth": answer,
        "extra_info": verl_extra_info(copy.deepcopy(dict(extra))),
    }
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return given
    return {name: value for name, value in given.items() if name in params}


def verl_batch_style(fn: Callable) -> bool:
    """Whether a batch function takes verl's BatchRewardManager arguments (`solution_strs`, `ground_truths`)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "solution_strs" in params and "ground_truths" in params


def verl_extra_info(extra: dict[str, Any]) -> Any:
    """A row's `extra_info` as verl passes it: the row's `extra_info` column when
    `data.columns.extra` lists it, else the dict of the listed columns (`extra`: the row's copy)."""
    return extra["extra_info"] if "extra_info" in extra else extra


def verl_value(value: object) -> object:
    """A verl function's return value as a reward function's: a dict's `score` as `reward`, its
    other number (and bool) entries as components, the rest left out; a number as it is."""
    if not isinstance(value, dict):
        return value
    if "score" not in value:
        raise ValueError(f"returned a dict without verl's 'score' key (keys: {sorted(map(str, value))})")
    out: dict[str, object] = {"reward": value["score"]}
    for key, item in value.items():
        if key != "score" and isinstance(item, (numbers.Real, bool)):
            out[str(key)] = float(item)
    return out
