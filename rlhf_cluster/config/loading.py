"""Loading a job config: YAML, `section.field=value` overrides, and pydantic's errors turned into
one message naming the file and every dotted field."""

from __future__ import annotations

import difflib
import re
import types
from pathlib import Path
from typing import Annotated, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from rlhf_cluster.config.base import ConfigError, glued_colon
from rlhf_cluster.config.job import JobConfig

Root = TypeVar("Root", bound=BaseModel)


class ConfigLoader(yaml.SafeLoader):
    """YAML as a config is read: PyYAML's safe loader, but `1e-5` is the number YAML 1.2 (and every
    peer's config) reads it as, not a string (YAML 1.1 floats need a dot): a string reached
    `data.chat_template_kwargs` and `generation.engine_kwargs` as written."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


_INDEXED = re.compile(r"([A-Za-z_]\w*)\[(\d+)\]")


def _segments(dotted: str) -> list[str | int]:
    """An override's key as the path it walks: `scoring.rewards[0].weight` and Hydra's
    `scoring.rewards.0.weight` both give ['scoring', 'rewards', 0, 'weight']."""
    out: list[str | int] = []
    for part in dotted.split("."):
        if indexed := _INDEXED.fullmatch(part):
            out += [indexed[1], int(indexed[2])]
        else:
            out.append(int(part) if part.isdigit() else part)
    return out


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    """Set `dotted` (`section.field`, a list's item by index) in the raw config `tree` to `value`."""
    keys = _segments(dotted)
    node: dict | list = tree
    for depth, key in enumerate(keys[:-1]):
        where = field_path(tuple(keys[: depth + 1]))
        if isinstance(node, list):
            index = _index(node, key, dotted, field_path(tuple(keys[:depth])))
            if isinstance(node[index], str) and keys[depth - 1] in _UNION_TAGS:
                node[index] = {"type": node[index]}  # `rewards: [verifier]`, then `rewards.0.weight=2`
            node = node[index]
        else:
            key = _key(node, key, dotted, where)
            if key in _UNION_TAGS and isinstance(node.get(key), str):
                node[key] = {"type": node[key]}  # `backend: deepspeed`, then `--set learner.backend.zero_stage=2`
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {where} is not a section")
    if isinstance(node, list):
        node[_index(node, keys[-1], dotted, field_path(tuple(keys[:-1])))] = value
    else:
        node[_key(node, keys[-1], dotted, field_path(tuple(keys)))] = value


def _index(items: list, key: str | int, dotted: str, where: str) -> int:
    if not isinstance(key, int):
        raise ConfigError(f"override {dotted!r}: {where} is a list; name an item by its index ({where}[0])")
    if key >= len(items):
        raise ConfigError(f"override {dotted!r}: {where} has {len(items)} item(s), no [{key}]")
    return key


def _key(node: dict, key: str | int, dotted: str, where: str) -> str:
    if isinstance(key, int) and str(key) not in node:
        listed = where.rsplit("[", 1)[0]
        raise ConfigError(
            f"override {dotted!r}: {listed} is not a list the config file sets (its default cannot be indexed); "
            f"give the whole list: --set '{listed}=[...]'"
        )
    return str(key)


# Where pydantic puts a union's tag into an error location (`learner.backend.deepspeed.zero_stage`):
# the tag is not a field, so messages leave it out.
_UNION_TAGS = {
    "backend": {"fsdp2", "deepspeed"},
    "transport": {"filesystem", "direct", "collective"},
    "rewards": {"verifier", "function", "model", "judge"},
}


def field_path(loc: tuple) -> str:
    """A pydantic error location as the dotted field path a user writes (`scoring.rewards[0].function`)."""
    out = ""
    for i, part in enumerate(loc):
        owner = loc[i - 2] if i >= 2 and isinstance(loc[i - 1], int) else loc[i - 1] if i else None
        if isinstance(part, str) and isinstance(owner, str) and part in _UNION_TAGS.get(owner, ()):
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(top level)"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job config, apply `key.sub=value` overrides, and validate it.

    Errors name the file and every offending field with what was expected. Rules between
    sections and checks of named files are `preflight`'s.
    """
    return load_model(JobConfig, path, overrides)


def _read_file(file: Path) -> dict:
    """The mapping a config file holds; a missing, empty or unparsable file is refused naming it."""
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist")
    text = file.read_text()
    if not text.strip():  # most likely the wrong file
        raise ConfigError(
            f"config file {file} is empty: expected a mapping of sections, e.g. `train: {{total_steps: 20}}` "
            "(configs/demo.yaml is a complete example)"
        )
    try:
        with file.open(encoding="utf-8") as stream:  # read from the file, YAML's errors name it
            raw = yaml.load(stream, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {file} is not valid YAML: {exc}") from exc
    if raw is None:  # comments only: no settings, most likely not what was meant either
        raise ConfigError(
            f"config file {file} holds no settings (comments only): expected a mapping of sections, "
            "e.g. `train: {total_steps: 20}`"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {file} must hold a mapping at the top level, got {type(raw).__name__}")
    return raw


def _override_value(item: str, value: str) -> object:
    """The YAML value of the override `item`; one that does not parse is refused naming the override."""
    loader = ConfigLoader(value)
    loader.name = f"--set {item}"  # YAML's error marks name the override, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load_model(root: type[Root], path: str | Path | None = None, overrides: list[str] | None = None) -> Root:
    """`load_config` for any root config class (the job's, the Tinker server's)."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = _read_file(Path(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), _override_value(item, value))
    try:
        return root.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {field_path(err['loc'])}: {_explain(root, err)}" for err in exc.errors()]
        given = "".join(f" --set {o}" for o in overrides or [])  # an error may be the override's
        given = f" with{given}" if given else ""
        raise ConfigError(f"invalid config {source}{given}:\n" + "\n".join(lines)) from None


def _explain(root: type[BaseModel], err: ErrorDetails) -> str:
    """What one pydantic error says, with what was expected where pydantic leaves it out."""
    got = err.get("input")
    if err["type"] == "extra_forbidden":
        detail = (glued_colon(err["loc"][-1], key=True) if got is None else None) or _unknown_field(root, err["loc"])
        return f"{err['msg']} (no such field{'; ' if detail else ''}{detail})"
    if err["type"] in ("model_type", "dict_type") and (glued := glued_colon(got, key=False)):
        return f"{err['msg']} ({glued})"
    return err["msg"] + ("" if isinstance(got, dict) else f" (got {got!r})")


def _unknown_field(root: type[BaseModel], loc: tuple) -> str:
    """A key that is no field: the nearest field names when one is close, else the section's fields
    ("" when the section is not found)."""
    fields = _fields_at(root, loc[:-1])
    if not fields:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), fields, n=3)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    section = field_path(loc[:-1]) if loc[:-1] else "the top level"
    other = ""
    if len(loc) > 2 and section == field_path(loc[:-2]):  # loc[-2] is a union's tag: name the kind
        section += f" ({loc[-2]})"
        owner = loc[-3] if isinstance(loc[-3], str) else loc[-4]  # (a list's index sits between)
        kinds = sorted(_UNION_TAGS.get(owner, set()) - {loc[-2]})
        fits = [kind for kind in kinds if loc[-1] in _fields_at(root, (*loc[:-2], kind))]
        if fits:
            other = f"; {loc[-1]} is {' or '.join(fits)}'s: set {section.split(' (')[0]}.type to it"
    return f"{section} has: {', '.join(fields)}{other}"


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section at the error location `loc` (union tags and list indexes
    included, as pydantic writes them); [] when it is no section of known fields."""
    kinds: list[object] = [root]
    for part in loc:
        models = [m for m in _models_in(kinds) if isinstance(part, str)]
        tagged = [m for m in models if "type" in m.model_fields and m.model_fields["type"].default == part]
        if tagged:  # a typed union's tag: the kind it picked
            kinds = list(tagged)
        elif isinstance(part, int):
            kinds = [arg for kind in _flatten(kinds) for arg in get_args(kind)[-1:]]  # list item, dict value
        else:
            kinds = [m.model_fields[part].annotation for m in models if part in m.model_fields]
    models = _models_in(kinds)
    return list(models[0].model_fields) if len(models) == 1 else []


def _flatten(kinds: list[object]) -> list[object]:
    """The types in `kinds` with Annotated, Optional and unions taken apart."""
    out: list[object] = []
    for kind in kinds:
        origin = get_origin(kind)
        if origin is Annotated:
            out += _flatten([get_args(kind)[0]])
        elif origin is Union or origin is types.UnionType:
            out += _flatten(list(get_args(kind)))
        else:
            out.append(kind)
    return out


def _models_in(kinds: list[object]) -> list[type[BaseModel]]:
    return [k for k in _flatten(kinds) if isinstance(k, type) and issubclass(k, BaseModel)]
