"""docs/algorithms.md's "Coming from veRL, TRL, OpenRLHF or slime" table names only fields that
exist: every backticked dotted path in its "here" column resolves in `JobConfig`, and a value
written after it (`path: a / b`) is one the field accepts."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from rlhf_cluster.config import JobConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "algorithms.md"
SECTIONS = ("algorithm", "learner", "generation", "train", "data", "checkpoint")


def _rows() -> list[list[str]]:
    text = DOC.read_text()
    table = text.split("\n### Coming from veRL, TRL, OpenRLHF or slime\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _models(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _literals(annotation: object) -> set[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return {str(a) for a in typing.get_args(annotation)}
    return {v for arg in typing.get_args(annotation) for v in _literals(arg)}


def _field(path: str):
    model: type[BaseModel] = JobConfig
    field = None
    for part in path.split("."):
        assert model is not None, f"{path}: {part} is below a plain value"
        assert part in model.model_fields, f"{path}: no field {part!r} in {model.__name__}"
        field = model.model_fields[part]
        found = _models(field.annotation)
        model = found[0] if found else None  # type: ignore[assignment]
    return field


def test_every_field_in_the_porting_table_exists():
    rows = _rows()
    assert len(rows) >= 20
    checked = 0
    path_re = re.compile(rf"((?:{'|'.join(SECTIONS)})(?:\.[a-z0-9_]+)+)(: (.*)| .*)?$")  # `path`, `path: values` or `path / ...`
    for row in rows:
        for code in re.findall(r"`([^`]+)`", " ".join(row[1:])):  # the "here" and "mind" columns
            found = path_re.match(code)
            if not found:
                continue
            field = _field(found.group(1))
            checked += 1
            for value in filter(None, (v.strip() for v in (found.group(3) or "").split("/"))):
                assert value in _literals(field.annotation), f"{code}: {value!r} is not an allowed value"
    assert checked >= 29


def test_the_table_keeps_the_traps_it_warns_about():
    text = " ".join(" ".join(row) for row in _rows())
    for name in ("low_var_kl", "norm_adv_by_std_in_grpo", "ppo_mini_batch_size", "COUNT", "use_dynamic_bsz",
                 "target_kl", "per-sequence", "use_remove_padding", "ulysses_sequence_parallel_size",
                 "old_log_prob", "filter_groups", "router_replay", "--tis-clip-low"):
        assert name in text, name
