"""The building blocks of a config: strict sections, typed unions picked by `type`, the error type,
and the resources section every pool uses."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class ConfigError(ValueError):
    """A config cannot be used: a file that does not read or validate, or a rule `preflight`
    refuses. The message names the file or the dotted field and what was expected."""


class _Strict(BaseModel):
    # revalidate_instances: a section passed in as an object is copied, so filling in its
    # derived seed never changes an object the caller still holds.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, revalidate_instances="always")


class _Typed(_Strict):
    """One kind of a pluggable part; its `type` names the kind. Code asks which kind a part is
    with `isinstance` on its class, never by comparing the `type` string.
    """

    __hash__ = None  # type: ignore[assignment]  # mutable, like every section


_GLUED = re.compile(r"([A-Za-z_]\w*):(\S.*)")


def glued_colon(text: object, *, key: bool) -> str | None:
    """Why a YAML key (`key=True`, read with no value) or string `name:value` is most likely a
    mapping written without the space after its colon (`{n:2}` is the key `n:2`, `n:2` one
    string); None for anything else."""
    match = _GLUED.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    if key:
        return (
            f"YAML read {text!r} as a key with no value: in a flow mapping `key: value` needs a space after "
            f"the colon ({{{match[1]}: {match[2]}}})"
        )
    return f"YAML read {text!r} as one string: `key: value` needs a space after the colon ({match[1]}: {match[2]})"


def _glued_type(value: object) -> str | None:
    """`glued_colon` for a typed union's `type` written without the space (`{type:deepspeed}`)."""
    if isinstance(value, str) and value.startswith("type:"):
        return glued_colon(value, key=False)
    if isinstance(value, dict) and "type" not in value:
        glued = [k for k, v in value.items() if v is None and isinstance(k, str) and k.startswith("type:")]
        return glued_colon(glued[0], key=True) if glued else None
    return None


def typed_union(*kinds: type[_Typed]):
    """The annotation of a pluggable part: one of `kinds`, picked by the `type` key.

    A bare name is short for `{type: name}` (`backend: deepspeed`, also the old spelling); a
    mapping without `type` is refused with the kinds to choose from.
    """
    names = [k.model_fields["type"].default for k in kinds]

    def shorthand(value: object) -> object:
        if (glued := _glued_type(value)) is not None:
            raise ValueError(f"needs a `type`: one of {', '.join(names)}; {glued}")
        if isinstance(value, str):
            return {"type": value}
        if isinstance(value, dict) and "type" not in value:
            raise ValueError(f"needs a `type`: one of {', '.join(names)}{_kind_hint(value, kinds, names)}")
        if isinstance(value, (int, float, list, tuple)):  # neither a kind's name nor a section (bool is an int)
            raise ValueError(f"expected one of {', '.join(names)}, or a mapping with `type`: one of them")
        return value

    # Union over a tuple built at run time: `X | Y` cannot spell it.
    return Annotated[Union[kinds], Field(discriminator="type"), BeforeValidator(shorthand)]  # noqa: UP007


def _kind_hint(value: dict, kinds: tuple, names: list[str]) -> str:
    """What a typed union's mapping without `type` has and which kind it fits: `zero_stage` alone
    (an override `--set learner.backend.zero_stage=2`) is deepspeed's; `typ` is close to `type`; a
    key that is a kind's name (`model: ...`) is that kind."""
    keys = [str(k) for k in value]
    if not keys:
        return ""
    if near := difflib.get_close_matches("type", keys, n=1, cutoff=0.6):
        return f"; it has {near[0]!r}: did you mean 'type'?"
    if named := [k for k in keys if k in names]:
        return f"; {named[0]!r} is a kind: {{type: {named[0]}, ...}}"
    fits = [name for kind, name in zip(kinds, names) if set(keys) <= set(kind.model_fields)]
    if not fits:
        fields = {f for kind in kinds for f in kind.model_fields}
        close = [c for k in keys for c in difflib.get_close_matches(k, fields, n=1)]
        return f"; no kind has {', '.join(keys)}" + (f" (did you mean {', '.join(close)}?)" if close else "")
    given = ", ".join(f"{k}: {value[k]!r}" for k in keys)
    whose = f"{'is' if len(keys) == 1 else 'are'} {' or '.join(fits)}'s"
    return f"; {', '.join(keys)} {whose}: {{type: {fits[0]}, {given}}}"


def _refuse_renamed(data: object, section: str, renamed: dict[str, str]) -> None:
    """An old field name is an error that names its new name, never silently ignored or accepted."""
    if isinstance(data, dict):
        for old, new in renamed.items():
            if old in data:
                raise ValueError(f"{section}.{old} was renamed to {section}.{new}")


class FailureBudget(_Strict):
    """How many of a user-supplied part's calls may fail (a reward function's, a judge's, an agent's)
    before the job stops naming it (`rlhf_cluster.user_code.FailureRate`); until then a failed call
    costs only its sample. One budget per worker."""

    max_failure_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The job stops with an error naming the part, the failure rate and the last cause when more "
        "than this share of the last `failure_window` samples a worker scored failed (judged once the window is "
        "full; a warning is logged past half of it; a failed batch call fails each of its samples), or when its "
        "first 32 calls all failed. A reward function or a judge has this budget with `on_error: drop`; dropping "
        "that many samples would bias or starve training.",
    )
    failure_window: int = Field(
        200,
        ge=1,
        description="Recent samples (per worker; a per-sample function's calls) over which `max_failure_fraction` is "
        "judged; size it above a batch function's calls.",
    )


class ResourcesConfig(_Strict):
    """Ray resources of one actor of a pool."""

    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per actor (0 lets tiny demos overcommit).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor.")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom resources, e.g. {generation_node: 1}.")
