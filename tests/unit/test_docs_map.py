"""docs/operations.md's "Where is X" names every part of a job a user configures: every section of
`JobConfig`, and every kind (`type:`) of each pluggable part (reward sources, weight transports, an
agent's environment, learner backends), each beside its config path. The lists are read from the
config models, so a new section or kind fails here until a row says where it lives."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from rlhf_cluster.config import JobConfig
from rlhf_cluster.config.base import _Strict, _Typed, typed_union

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def where_is_x_rows(text: str) -> list[str]:
    """The body rows of the "Where is X" table (header and rule left out)."""
    table = text.split("\n## Where is X\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    return [row for row in rows[2:] if not set(row) <= set("|-: ")]


def _models(annotation: object) -> list[type[BaseModel]]:
    """The config models an annotation can hold (through Optional, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models(arg)]


def config_sections(job: type[BaseModel] = JobConfig) -> list[str]:
    """The top-level fields of a job that are sections (a model of their own), not plain values."""
    return [name for name, field in job.model_fields.items() if _models(field.annotation)]


def pluggable_kinds(model: type[BaseModel] = JobConfig, prefix: str = "") -> dict[str, list[str]]:
    """Every field whose value is picked by `type:`, by its dotted config path, with its kinds."""
    out: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        models = _models(field.annotation)
        kinds = [m.model_fields["type"].default for m in models if issubclass(m, _Typed)]
        if kinds:
            out[path] = kinds
        for inner in models:
            out.update(pluggable_kinds(inner, f"{path}."))
    return out


def _names_path(row: str, path: str) -> bool:
    """Whether a cell of `row` names config path `path` after the word `config` (in backticks,
    alone or a field of it: `path.x`). A module or CLI command of the same name does not count."""
    return re.search(rf"(^|[\s;(])config [^|]*`{re.escape(path)}(\.[^`\s]+)?`", row) is not None


def unmapped(text: str, job: type[BaseModel] = JobConfig) -> list[str]:
    """What the "Where is X" table of `text` does not name of `job`'s config: sections, and
    `path: kind` pairs (a kind is named as `kind` or `type: kind`, in backticks, in a row that names
    its path)."""
    rows = where_is_x_rows(text)
    missing = [f"section `{s}`" for s in config_sections(job) if not any(_names_path(r, s) for r in rows)]
    for path, kinds in pluggable_kinds(job).items():
        for kind in kinds:
            named = re.compile(rf"`(type: )?{re.escape(kind)}`")
            if not any(_names_path(r, path) and named.search(r) for r in rows):
                missing.append(f"`{path}` kind `{kind}`")
    return missing


def test_the_lists_come_from_the_config():
    # What the walk must find today; a new section or kind only adds to these.
    assert {"model", "scoring", "weights", "guardrails", "critic", "reward_model"} <= set(config_sections())
    assert not {"name", "run_dir", "seed"} & set(config_sections())
    kinds = pluggable_kinds()
    assert set(kinds["scoring.rewards"]) >= {"verifier", "function", "model", "judge"}
    assert set(kinds["weights.transport"]) >= {"filesystem", "direct", "collective"}
    assert "openenv" in kinds["generation.agent.environment"]


def test_where_is_x_names_every_section_and_kind():
    missing = unmapped(OPERATIONS.read_text())
    assert not missing, f'docs/operations.md\'s "Where is X" has no row naming {", ".join(missing)}'


def test_a_missing_row_fails():
    text = OPERATIONS.read_text()
    for gone in ("judge", "openenv", "collective", "guardrails"):
        cut = "\n".join(
            line
            for line in text.splitlines()
            if not (line.startswith("|") and (f"`{gone}`" in line or f"`type: {gone}`" in line))
        )
        assert any(gone in entry for entry in unmapped(cut)), f"a table without its {gone!r} rows still passed"


class _Pigeon(_Typed):
    type: typing.Literal["pigeon"] = "pigeon"


class _Carriers(_Strict):
    carrier: typed_union(_Pigeon) = _Pigeon()  # type: ignore[valid-type]


class _GrownJob(JobConfig):
    """A job a later feature grew by a section with a pluggable part of its own."""

    carriers: _Carriers = _Carriers()


def test_a_new_section_or_kind_without_a_row_fails():
    missing = unmapped(OPERATIONS.read_text(), _GrownJob)
    assert missing == ["section `carriers`", "`carriers.carrier` kind `pigeon`"]
