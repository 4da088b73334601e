"""The benchmarks' shared helpers: the learning benchmarks' parser, held-out figures and result
file, and the random models' shapes (pure parts: no job runs, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks._learning import (
    beats_control,
    held_out,
    held_out_text,
    jobs_parser,
    print_jobs,
    run_per_seed,
    write_jobs,
)
from benchmarks.common import args_config, headline, print_table, qwen2_shape


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
    write_jobs(args, "example", False, 2.0, [{"gain": 0.1}], {"a": [0.1]}, top, teacher_run={"x": 1})
    written = json.loads(args.out.read_text())
    assert list(written)[:6] == ["benchmark", "machine", "complete", "seconds", "config", "teacher_run"]
    assert written["benchmark"] == "example" and written["complete"] is False
    assert written["gains"] == {"a": [0.1]} and written["headline"]["met"] is True


def test_qwen2_shape_heads_from_width():
    shape = qwen2_shape(256, 2, kv_heads=2, positions=300)
    assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (4, 2, 1024)
    assert shape.max_position_embeddings == 300
    assert qwen2_shape(128, 1, kv_heads=1, intermediate=200).intermediate_size == 200


def test_run_per_seed_runs_every_side_per_seed_and_reports_after_each(capsys):
    args = SimpleNamespace(seeds=[0, 1], sides=["a", "b"])
    reports: list[tuple[int, bool]] = []

    def job(side: str, seed: int) -> dict:
        return {"side": side, "seed": seed, "sampled_before": 0.1, "sampled_after": 0.3, "gain": 0.2}

    jobs = run_per_seed(args, job, held_out_text, lambda jobs, s, final: reports.append((len(jobs), final)), 0.0)
    assert [(j["seed"], j["side"]) for j in jobs] == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert all(j["seconds"] >= 0 for j in jobs) and reports == [(1, False), (2, False), (3, False), (4, False)]
    out = capsys.readouterr().out
    assert out.count("sampled held-out 0.100 -> 0.300 (+0.200)") == 4
    print_jobs(jobs, "kind", more={"note": lambda j: f"n{j['seed']}"})
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["kind", "seed", "before", "after", "gain", "note"] and table[-1].split()[-1] == "n1"


def test_beats_control_needs_every_seed_above_the_controls_best_and_zero():
    assert beats_control({"x": [0.2, 0.3], "c": [0.1, -0.1]}, "x", "c")
    assert not beats_control({"x": [0.2, 0.05], "c": [0.1]}, "x", "c")
    assert not beats_control({"x": [-0.1], "c": [-0.3]}, "x", "c")  # beats the control, yet lost
    assert not beats_control({"x": [0.2], "c": []}, "x", "c")


def test_random_sample_draws_prompt_then_response_then_advantage():
    import random

    from benchmarks.common import random_sample

    sample = random_sample(random.Random(0), 5, 3, 4, 50, -6.0, "stop")
    rng = random.Random(0)
    prompt, response = [rng.randrange(2, 50) for _ in range(3)], [rng.randrange(2, 50) for _ in range(4)]
    assert (sample.prompt_ids, sample.response_ids) == (prompt, response)
    assert sample.advantages == [rng.uniform(-1, 1)] * 4 and sample.ref_logprobs == [-6.0] * 4
    assert (sample.prompt_id, sample.group_id, sample.finish_reason) == ("p1", "g1", "stop")


def test_gpu_check_runs_every_step_once_with_its_result_file(tmp_path: Path):
    from benchmarks.gpu.check import STEPS, parse_args, steps

    for smoke in ([], ["--smoke"]):
        planned = steps(parse_args(["--out-dir", str(tmp_path), *smoke]))
        assert [name for name, _, _ in planned] == ["tests/gpu", *(name for name, _, _ in STEPS)]
        for (_, command, _), (_, module, result) in zip(planned[1:], STEPS):
            assert command[2] == f"benchmarks.gpu.{module}" and command[-2:] == ["--out", str(tmp_path / result)]


def test_gpu_check_only_skip_and_earlier_issues(tmp_path: Path):
    from benchmarks.gpu.check import EARLIER_ISSUES, parse_args, wanted

    def runs(*flags: str, smoke: bool = False) -> set[str]:
        args = parse_args(["--out-dir", str(tmp_path), *flags])
        args.smoke = smoke
        return {name for name in ("tests/gpu", "learner 0.5B", "learner MoE", *EARLIER_ISSUES) if wanted(args, name)}

    assert runs() == {"tests/gpu", "learner 0.5B"}  # a GPU without --all: the MoE's figure is measured
    assert "learner MoE" in EARLIER_ISSUES and "learner 1.5B" not in EARLIER_ISSUES
    assert runs("--all") == {"tests/gpu", "learner 0.5B", "learner MoE", *EARLIER_ISSUES}
    # At tiny shapes every step but those that would be the 0.5B steps again, or a unit test's.
    assert runs(smoke=True) == {
        "tests/gpu", "learner 0.5B", "learner MoE", "scoring and host hop 0.5B", "profile 0.5B", "compile parity"
    }
    assert runs("--only", "host hop 1.5B", smoke=True) == {"host hop 1.5B"}  # asked for by name, it runs
    assert runs("--only", "tests/gpu", "learner MoE") == {"tests/gpu", "learner MoE"}
    assert runs("--only", "host hop 1.5B") == {"host hop 1.5B"}  # --only names an earlier issue's step too
    assert runs("--skip", "learner 0.5B") == {"tests/gpu"}
    assert "learner 0.5B, more sides" not in EARLIER_ISSUES  # DeepSpeed and compile: compile's speed is open


def test_gpu_check_parses_every_gpu_command_and_leaves_out_only_smoke_duplicates(tmp_path: Path):
    """Each GPU step's command is accepted by its module's own parser (the CPU run uses other
    flags, so a renamed option would otherwise first fail on a GPU); a step the CPU run leaves out
    as another's duplicate runs that step's module with a subset of its flags at the smoke shape."""
    import importlib

    from benchmarks.gpu.check import SMOKE_SAME_AS, STEPS, parse_args, smoke_flags, steps

    modules = {name: module for name, module, _ in STEPS}
    for name, command, _ in steps(parse_args(["--out-dir", str(tmp_path)]))[1:]:
        module = importlib.import_module(command[2])
        parse = getattr(module, "parse_args", None)
        if parse is not None:  # step_profile parses inside its main
            assert parse(command[3:]).out == Path(command[-1]), name
    flags = smoke_flags(parse_args(["--out-dir", str(tmp_path), "--smoke"]))
    for left_out, same in SMOKE_SAME_AS.items():
        assert modules[left_out] == modules[same]
        theirs, ours = flags[left_out][0], flags[same][0]
        assert theirs[theirs.index("--shape") + 1] == ours[ours.index("--shape") + 1] == "smoke"
        assert set(theirs) - {"--no-plain", "--parts", "host_hop"} <= set(ours), (left_out, theirs, ours)


def test_a_failing_side_is_an_error_row_and_the_rest_still_runs(capsys):
    import argparse

    from benchmarks.gpu.sides import time_side

    class Broken:
        def step(self, batch) -> None:
            raise ValueError("no kernel")

    def unbuildable():
        raise RuntimeError("bad folder")

    args = argparse.Namespace(warmup=0, reps=1)
    assert time_side(args, "broken", Broken, {"default": None, "long": None}) == {
        "default": {"error": "ValueError: no kernel"},
        "long": {"error": "ValueError: no kernel"},
    }
    assert time_side(args, "x", unbuildable, {"default": None}) == {
        "default": {"error": "RuntimeError building it: bad folder"}
    }
    assert "Traceback" in capsys.readouterr().err  # the log shows where it failed


def test_the_gpu_checks_moe_is_the_size_it_says():
    """`qwen3-moe-1.6b-a0.6b` (built on the meta device): the total and active parameters its
    comment, check.py and benchmarks/README.md give."""
    from transformers import Qwen3MoeConfig

    from benchmarks.gpu.models import MOE_SHAPES, VOCAB, parameter_counts

    shape = MOE_SHAPES["qwen3-moe-1.6b-a0.6b"]
    assert parameter_counts(Qwen3MoeConfig(vocab_size=VOCAB, **shape)) == (1_645_796_352, 588_831_744)


def test_rounds_options_and_their_check():
    import argparse

    from benchmarks.common import add_rounds, parse_rounds

    p = argparse.ArgumentParser()
    add_rounds(p, "example", reps=4, warmup=1)
    args = parse_rounds(p, [])
    assert (args.reps, args.warmup, args.out.name) == (4, 1, "example.json")
    with pytest.raises(SystemExit):
        parse_rounds(p, ["--reps", "0"])


def test_a_table_without_rows_prints_its_headers(capsys):
    """gpu-check's table when every step failed (tests/gpu alone, failing, on one H200): no rows."""
    print_table(["figure", "seconds"], [], ["{}", "{:.3f}"])
    print_table(["figure", "seconds"], [["a", 1.0], ["b", "ERROR x"]], ["{}", "{:.3f}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["figure", "seconds"] and lines[2].split() == ["a", "1.000"]
    assert lines[3].split() == ["b", "ERROR", "x"]


def test_rotated_jobs_runs_each_setting_per_rep_in_rotated_order(monkeypatch, tmp_path: Path, capsys):
    """async_vs_sync's and spares' jobs: rotated settings, one run dir each, a line after each job."""
    import contextlib

    import benchmarks.common as common

    seen: list[tuple] = []
    monkeypatch.setattr(common, "local_ray", lambda verbose, prefix: contextlib.nullcontext(tmp_path / prefix))
    monkeypatch.setattr(common.time, "sleep", lambda s: seen.append(("sleep", s)))

    def run(args, setting, rep, run_dir):
        seen.append((setting, rep, run_dir))
        return {"setting": setting, "rep": rep}

    args = SimpleNamespace(verbose=False, reps=2)
    jobs = common.rotated_jobs(args, "bench-x-", "spares", (0, 1), run, lambda job: f"job {job['rep']}")
    assert [(j["setting"], j["rep"]) for j in jobs] == [(0, 0), (1, 0), (1, 1), (0, 1)]
    assert seen[0] == (0, 0, tmp_path / "bench-x-" / "s0-r0") and seen[1] == ("sleep", 2)
    assert capsys.readouterr().out.splitlines() == [
        "  rep 0 spares 0: job 0",
        "  rep 0 spares 1: job 0",
        "  rep 1 spares 1: job 1",
        "  rep 1 spares 0: job 1",
    ]
