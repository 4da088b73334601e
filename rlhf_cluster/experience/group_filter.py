"""Dynamic sampling's test as the user's own function (`algorithm.shaping.group_filter`; slime's
`--dynamic-sampling-filter-path`): `module:function`, imported once per process, called with each
scored group's samples (copies: the group itself is not the function's to change), True to keep it.
An exception it raises, or an answer that is not a bool, ends the job naming the field."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.user_code import import_spec

FIELD = "algorithm.shaping.group_filter"


@functools.cache
def load_group_filter(spec: str) -> Callable[[list[ScoredSample]], object]:
    """The function `spec` names (ValueError naming the field when it cannot be imported or called)."""
    fn = import_spec(spec, FIELD, example="my_filters:keep")
    if not callable(fn):
        raise ValueError(f"{FIELD}={spec!r}: a {type(fn).__name__}, not a function")
    return fn


def keeps(spec: str, samples: list[ScoredSample]) -> bool:
    """Whether the user's filter keeps this scored group."""
    try:
        answer = load_group_filter(spec)(copy.deepcopy(samples))
    except Exception as exc:
        raise RuntimeError(f"{FIELD}={spec!r} failed on group {samples[0].group_id!r}: {exc!r}") from exc
    if type(answer).__name__ not in ("bool", "bool_"):  # numpy's bool too
        raise TypeError(
            f"{FIELD}={spec!r} returned a {type(answer).__name__} for group {samples[0].group_id!r}: "
            "expected True (keep the group) or False (drop it)"
        )
    return bool(answer)
