"""Trace spans, their trace-event JSON, and pool busy shares (pure logic; the demo-run trace is
checked end to end in tests/integration/test_observability.py)."""

from __future__ import annotations

import json

import pytest

from rlhf_cluster.telemetry import tracing
from rlhf_cluster.telemetry.tracing import PoolActivity, Tracer, chrome_trace, covered, parse_steps, step_window, write_trace


def _span(track, kind, name, start, end, **args):
    return {"track": track, "kind": kind, "name": name, "start": start, "end": end, **({"args": args} if args else {})}


def test_a_tracer_drains_what_it_recorded_once():
    t = Tracer("gen0", "generation")
    with t.span("generate", prompts=2):
        pass
    t.add("weights.load", 10.0, 12.5, version=3)
    spans = t.drain()
    assert [(s["name"], s["track"], s["kind"]) for s in spans] == [("generate", "gen0", "generation"),
                                                                    ("weights.load", "gen0", "generation")]
    assert spans[0]["args"] == {"prompts": 2} and spans[0]["end"] >= spans[0]["start"]
    assert t.drain() == []


def test_a_span_that_raises_is_recorded_and_the_error_propagates():
    t = Tracer("rank0", "learner")
    with pytest.raises(RuntimeError):
        with t.span("train_step"):
            raise RuntimeError("boom")
    assert [s["name"] for s in t.drain()] == ["train_step"]


def test_without_a_started_tracer_spans_cost_nothing_and_record_nothing():
    tracing._tracer = None
    with tracing.span("x"):
        pass
    tracing.add("y", 0, 1)
    assert tracing.drain() == []


def test_covered_is_the_union_inside_the_window():
    assert covered([(0, 2), (1, 3), (5, 6)], 0, 10) == 4
    assert covered([(0, 2), (1, 3), (5, 6)], 2.5, 5.5) == pytest.approx(1.0)
    assert covered([], 0, 1) == 0


def test_busy_shares_average_over_each_pools_workers():
    activity = PoolActivity()
    activity._closed = [("generation", "gen0", 0.0, 10.0), ("generation", "gen1", 0.0, 5.0), ("reward", "reward0", 2.0, 3.0),
                        ("reward", "reward0", 2.5, 4.0), ("generation", "gen0", -5.0, -1.0)]
    shares = activity.busy_shares(0.0, 10.0, {"generation": 2, "reward": 1, "reference": 1})
    assert shares == pytest.approx({"generation": 0.75, "reward": 0.2, "reference": 0.0})
    assert ("generation", "gen0", -5.0, -1.0) not in activity._closed  # before the window: forgotten


def test_chrome_trace_is_trace_event_json_with_a_track_per_actor_and_nested_lanes():
    spans = [
        _span("driver", "driver", "step", 100.0, 101.0, step=0),
        _span("gen0", "generation", "generate", 100.1, 100.5),
        _span("gen0", "generation", "generate", 100.2, 100.6),  # overlaps the first, not nested: a second lane
        _span("rank0", "learner", "train_step", 100.6, 100.9),
        _span("rank0", "learner", "forward", 100.6, 100.7),  # nested: same lane
    ]
    doc = json.loads(json.dumps(chrome_trace(spans)))
    threads = {e["args"]["name"]: (e["pid"], e["tid"]) for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert set(threads) == {"driver", "gen0", "gen0 (2)", "rank0"}
    processes = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert processes == {"driver", "generation", "learner"}
    complete = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [e["ts"] for e in complete] == sorted(e["ts"] for e in complete) and complete[0]["ts"] == 0
    forward = next(e for e in complete if e["name"] == "forward")
    assert forward["tid"] == threads["rank0"][1] and forward["dur"] == pytest.approx(1e5)


def test_a_step_window_selects_the_spans_of_those_steps(tmp_path):
    spans = [_span("driver", "driver", "step", 0, 1, step=0), _span("driver", "driver", "step", 1, 2, step=1),
             _span("gen0", "generation", "generate", 0.2, 0.4), _span("gen0", "generation", "generate", 1.5, 1.7)]
    assert step_window(spans, 1, 1) == (1, 2)
    out = write_trace(spans, tmp_path / "t.json", (1, 1))
    names = [e["name"] for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "X"]
    assert names == ["step", "generate"]
    with pytest.raises(ValueError, match="no such step"):
        write_trace(spans, tmp_path / "t.json", (5, 6))


@pytest.mark.parametrize("text, expected", [("3:7", (3, 7)), ("4", (4, 4)), (None, None)])
def test_steps_option(text, expected):
    assert parse_steps(text) == expected


@pytest.mark.parametrize("text", ["a:b", "7:3"])
def test_bad_steps_option_is_refused(text):
    with pytest.raises(ValueError, match="--steps"):
        parse_steps(text)


def test_the_trace_file_stops_growing_at_its_cap(tmp_path):
    from actors.reporting import Reporter
    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.run.run_dir import RunDir

    cfg = JobConfig.model_validate({"run_dir": str(tmp_path), "metrics": {"trace_max_mb": 1}})
    reporter = Reporter(cfg, RunDir(tmp_path, tmp_path / "weights", tmp_path / "checkpoints"))
    span = _span("gen0", "generation", "generate", 0.0, 1.0)
    for _ in range(300):
        reporter.trace([span] * 100)
    size = (tmp_path / "trace.jsonl").stat().st_size
    assert reporter.trace_full and (1 << 20) < size < (1 << 20) + 100 * 200
