"""A reward function written for verl, called as verl calls it: `compute_score(data_source,
solution_str, ground_truth, extra_info=None)` once per response, by keyword. A function whose
parameters name `solution_str` and `ground_truth` is one (`verl_style`); it gets

- `solution_str`: the response text; `ground_truth`: the answer (`data.columns.answer`, e.g.
  `reward_model.ground_truth`) as the file holds it (a list of accepted answers stays a list);
  `data_source`: the source (`data.columns.source`);
- `extra_info`: the row's `extra_info` column when `data.columns.extra` lists it, else the dict of
  the listed extra columns;

each only if its signature takes it (`**kwargs`: all). It returns a number, or a dict whose
`score` is the reward, as verl reads it: its other entries are recorded as components where they
are numbers (a bool as 0/1), left out where they are not (verl's `pred` string)."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

VERL_NAMES = ("data_source", "solution_str", "ground_truth", "extra_info")
OURS = ("prompt", "source", "extra", "prompt_id")  # a per-sample reward function's keywords (rewards.CONTEXT)
_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def verl_style(fn: Callable) -> bool:
    """Whether `fn` takes verl's per-sample arguments (it names `solution_str` and `ground_truth`)."""
    return _names(fn, "solution_str", "ground_truth")


def _names(fn: Callable, *names: str) -> bool:
    """Whether `fn`'s signature names every one of `names` (False without a signature to read)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in names)


def verl_keywords(fn: Callable, where: str) -> tuple[str, ...] | None:
    """The verl names (and any of ours: prompt, source, extra, prompt_id) `fn` takes by keyword (a
    `**kwargs` function: verl's four and those of ours it names), the names each call passes; a
    ValueError naming `where` when it cannot be called with them by keyword (a positional-only
    parameter, a required one none of these names)."""
    params = inspect.signature(fn).parameters
    offered = (*VERL_NAMES, *OURS)
    named = tuple(n for n in offered if n in params and params[n].kind in _BY_KEYWORD)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names = VERL_NAMES + tuple(n for n in named if n not in VERL_NAMES)  # verl's four, and ours it names
    else:
        names = named
    try:
        inspect.signature(fn).bind(**dict.fromkeys(offered if names is None else names))
    except TypeError as exc:
        unknown = [p.name for p in params.values() if p.default is p.empty and p.name not in (names or offered)]
        raise ValueError(
            f"{where}: a function written for verl is called by keyword with {list(VERL_NAMES)} (and any of "
            f"{list(OURS)}); it cannot be: {exc}" + (f" (it requires {unknown})" if unknown else "")
        ) from exc
    return names


def verl_arguments(
    names: tuple[str, ...] | None, response: str, answer: Any, source: str | None, extra: Mapping[str, Any], **ours
) -> dict[str, Any]:
    """The keyword arguments of one call of a verl-style function that takes `names` (None, a
    `**kwargs` function: verl's four, as verl passes them), any of ours it names (`ours`: prompt, prompt_id)."""
    copied = copy.deepcopy(dict(extra)) if names is None or {"extra_info", "extra"} & set(names) else {}
    given = {
        "data_source": source,
        "solution_str": response,
        "ground_truth": answer,
        "extra_info": verl_extra_info(copied),
        "source": source,
        "extra": copied,
        **ours,
    }
    return {name: given[name] for name in (VERL_NAMES if names is None else names) if name in given}


def verl_batch_style(fn: Callable) -> bool:
    """Whether a batch function takes verl's BatchRewardManager arguments (`solution_strs`, `ground_truths`)."""
    return _names(fn, "solution_strs", "ground_truths")


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
        if key == "score" or isinstance(item, (str, bytes)) or not hasattr(type(item), "__float__"):
            continue  # verl's `pred` string, a nested value: not a component
        try:
            number = float(item)
        except (TypeError, ValueError):  # a multi-element array
            continue
        if math.isfinite(number):  # (its own `reward` or `reward_failed` kept under verl's name)
            out[f"verl_{key}" if key in ("reward", "reward_failed") else str(key)] = number
    return out
