"""The benchmarks' shared helpers: the learning benchmarks' parser, held-out figures and result
file, and the random models' shapes (pure parts: no job runs, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks._jobs import held_out, jobs_parser, write_jobs_result
from benchmarks.common import args_config, headline, qwen2_shape


def test_jobs_parser_has_the_shared_options_and_the_sides():
    p = jobs_parser("Doc.\n\nMore.", "example", steps=120, sides=("a", "b"))
    args = p.parse_args(["--seeds", "4", "5", "--sides", "b"])
    assert args.seeds == [4, 5] and args.steps == 120 and args.sides == ["b"]
    assert args.out.name == "example.json" and not args.verbose
    assert p.parse_args([]).sides == ["a", "b"]
    with pytest.raises(SystemExit):
        p.parse_args(["--sides", "c"])
    assert not hasattr(jobs_parser("Doc.", "x", steps=None).parse_args([]), "sides")


def test_held_out_is_the_sampled_accuracy_and_its_gain():
    result = SimpleNamespace(sampled_accuracy_before=0.25, sampled_accuracy_after=0.75)
    assert held_out(result) == {"sampled_before": 0.25, "sampled_after": 0.75, "gain": 0.5}


def test_jobs_result_records_options_extras_jobs_gains_and_headline(tmp_path: Path):
    args = SimpleNamespace(out=tmp_path / "r.json", steps=3, keep=tmp_path)
    assert args_config(args) == {"steps": 3, "keep": str(tmp_path)}
    top = headline("every seed gains", 1.0, "= 1", True)
    write_jobs_result(args, "example", False, 2.0, [{"gain": 0.1}], {"a": [0.1]}, top, teacher_run={"x": 1})
    written = json.loads(args.out.read_text())
    assert list(written)[:6] == ["benchmark", "machine", "complete", "seconds", "config", "teacher_run"]
    assert written["benchmark"] == "example" and written["complete"] is False
    assert written["gains"] == {"a": [0.1]} and written["headline"]["met"] is True


def test_qwen2_shape_heads_from_width():
    shape = qwen2_shape(256, 2, kv_heads=2, positions=300)
    assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (4, 2, 1024)
    assert shape.max_position_embeddings == 300
    assert qwen2_shape(128, 1, kv_heads=1, intermediate=200).intermediate_size == 200
