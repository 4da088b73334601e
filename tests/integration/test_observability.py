"""deploy/ checked for real: promtool on the config and alert rules, a real Prometheus scraping a
running job through the driver's file_sd targets, and the Grafana dashboard's metric names against
the job's live /metrics endpoints.

Prometheus and promtool come from the Debian `prometheus` package (scripts/setup_system.sh, run by
scripts/setup.sh); without them these tests skip and say why.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "rlhf_cluster.json"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    not (PROMTOOL and PROMETHEUS),
    reason="prometheus/promtool not installed (Debian package `prometheus`; scripts/setup.sh installs it as root)",
)

# rlhf_* metric names in PromQL; not label values such as job="rlhf_cluster".
METRIC = re.compile(r"(?<![\w\"])rlhf_[a-z_]+\b(?!\")")
# Counters that only get samples when their event happens (a drop, a restart): a short healthy job
# may never produce one, so for these the dashboard only needs the name to be exported.
EVENT_COUNTERS = {"rlhf_buffer_samples_dropped_total", "rlhf_pool_worker_restarts_total",
                  "rlhf_weights_fingerprint_mismatches_total"}


def _promtool(*args: str) -> str:
    proc = subprocess.run([PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def _sample_names(body: str, job: str) -> set[str]:
    """Names of the samples labelled `job` in a text exposition (`name{labels} value` lines)."""
    line = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{[^}]*\bjob="' + re.escape(job) + '"', re.M)
    return {m.group(1) for m in line.finditer(body)}


def _declared_names(body: str) -> set[str]:
    """Every sample name the families declared in an exposition (`# TYPE`) can produce."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M):
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def _dashboard_panels() -> list[dict]:
    panels = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.extend([panel] if panel["type"] != "row" else panel.get("panels", []))
    return panels


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard_panels() for t in p.get("targets", []) if t.get("expr")]


@needs_prometheus
def test_promtool_accepts_config_rules_and_rule_tests():
    out = _promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert "1 rule files found" in out, out
    out = _promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert re.search(r"SUCCESS: \d+ rules found", out), out
    _promtool("test", "rules", str(DEPLOY / "alerts_test.yml"))

    # promtool cannot know our metric names: every rlhf_* name an alert uses must be one that
    # rlhf_cluster/telemetry/metrics.py declares, or the alert silently never fires.
    from prometheus_client import REGISTRY, generate_latest

    import rlhf_cluster.telemetry.metrics  # noqa: F401  (registers the collectors)

    declared = _declared_names(generate_latest(REGISTRY).decode())
    rules = [r for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 8
    for rule in rules:
        unknown = set(METRIC.findall(rule["expr"])) - declared
        assert not unknown, f"{rule['alert']} uses undeclared metrics {unknown}"
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), rule["alert"]


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = _dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr") for t in targets), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _query(base: str, expr: str) -> list[dict]:
    data = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert data["status"] == "success", (expr, data)
    return data["data"]["result"]


def _scrape_all(targets_file: Path) -> tuple[str, int]:
    groups = json.loads(targets_file.read_text())
    bodies = [
        urllib.request.urlopen(f"http://{target}/metrics", timeout=10).read().decode()
        for group in groups
        for target in group["targets"]
    ]
    return "\n".join(bodies), len(bodies)


@needs_prometheus
def _check_trace(doc: dict, pools: set[str], steps: int) -> None:
    """`doc` follows the trace-event format (chrome://tracing, Perfetto): complete events nest
    per thread; spans of every pool are there and in pipeline order."""
    assert isinstance(doc["traceEvents"], list) and doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    threads, processes, complete = {}, {}, []
    for e in doc["traceEvents"]:
        assert isinstance(e["name"], str) and isinstance(e["pid"], int) and isinstance(e["tid"], int), e
        assert e["ph"] in ("X", "M"), e
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "process_sort_index", "thread_name", "thread_sort_index"), e
            if e["name"] == "process_name":
                processes[e["pid"]] = e["args"]["name"]
            elif e["name"] == "thread_name":
                threads[(e["pid"], e["tid"])] = e["args"]["name"]
        else:
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0 and isinstance(e["dur"], (int, float)) and e["dur"] >= 0, e
            assert isinstance(e.get("args", {}), dict), e
            complete.append(e)
    # Complete events of one thread nest (or follow one another), as the viewers require.
    for key in threads:
        open_ends: list[float] = []
        for e in sorted((e for e in complete if (e["pid"], e["tid"]) == key), key=lambda e: (e["ts"], -e["dur"])):
            while open_ends and open_ends[-1] <= e["ts"]:
                open_ends.pop()
            assert not open_ends or e["ts"] + e["dur"] <= open_ends[-1] + 1, f"{threads[key]}: {e} overlaps its enclosing span"
            open_ends.append(e["ts"] + e["dur"])
    assert all((e["pid"], e["tid"]) in threads and e["pid"] in processes for e in complete)
    by_kind: dict[str, list[dict]] = {}
    for e in complete:
        by_kind.setdefault(processes[e["pid"]], []).append(e)
    assert set(by_kind) >= pools, (set(by_kind), pools)
    names = {kind: {e["name"] for e in events} for kind, events in by_kind.items()}
    assert {"step", "wait_for_batch", "train"} <= names["driver"]
    assert "generate" in names["generation"] and "weights.load" in names["generation"]
    assert "score" in names["reward"]
    assert {"train_step", "forward", "backward", "optimizer", "publish"} <= names["learner"]
    assert sum(e["name"] == "step" for e in by_kind["driver"]) == steps
    # Pipeline order: each learner step runs inside the driver's `train` call of that step, and
    # the first responses were generated before the first learner step began.
    trains = sorted((e for e in by_kind["driver"] if e["name"] == "train"), key=lambda e: e["ts"])
    rank_steps = sorted((e for e in by_kind["learner"] if e["name"] == "train_step"), key=lambda e: e["ts"])
    assert len(rank_steps) >= steps
    for e in rank_steps:
        assert any(t["ts"] <= e["ts"] and e["ts"] + e["dur"] <= t["ts"] + t["dur"] for t in trains), e
    first_generate = min(e["ts"] + e["dur"] for e in by_kind["generation"] if e["name"] == "generate")
    assert first_generate <= rank_steps[0]["ts"]


def test_prometheus_scrapes_a_live_job_and_dashboard_metrics_exist(ray_cluster, job_config, tmp_path):
    from actors.commands.cli import app
    from actors.job import Job

    # Its own job name: the driver's collectors live in this process and may hold other tests' series.
    # Held-out evaluation every 3 steps, so its series (and pass@k) are live too.
    cfg = job_config(name="observability", train={"total_steps": 8, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
                     data={"eval_prompts": 4, "eval_samples": 4, "eval_pass_k": [1, 2], "eval_every_steps": 3})
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # file_sd watches this directory from the start
    targets_file = run_dir / "prometheus_targets.json"

    # deploy/prometheus.yml itself (its honor_labels and rules), pointed at this job, 1 s scrapes.
    prom_cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    prom_cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    prom_cfg["rule_files"] = [str(DEPLOY / name) for name in prom_cfg["rule_files"]]
    (scrape,) = prom_cfg["scrape_configs"]
    scrape["file_sd_configs"] = [{"files": [str(targets_file)], "refresh_interval": "1s"}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "prometheus.log", "w")
    # Started before the job so its startup overlaps the pools'; ended by this handle only.
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    job = None
    outcome: dict = {}
    thread = None
    try:
        job = Job(cfg)

        def run_job():
            try:
                outcome["result"] = job.run()
            except BaseException as exc:  # reported by the main thread
                outcome["error"] = exc

        thread = threading.Thread(target=run_job, name="rlhf-job", daemon=True)
        thread.start()

        # Prometheus answers with the job's values (labels kept by honor_labels: job = cfg.name).
        sel = f'{{job="{cfg.name}"}}'
        want = {
            f"sum(rlhf_generation_tokens_total{sel})": lambda v: v > 0,
            f"sum(rlhf_learner_step_seconds_count{sel})": lambda v: v > 0,
            f"count(rlhf_buffer_depth{sel})": lambda v: v >= 1,
        }
        seen: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while True:
            if "error" in outcome:
                raise outcome["error"]
            assert prom.poll() is None, f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()}"
            try:
                for expr in want:
                    result = _query(base, expr)
                    if result:
                        seen[expr] = float(result[0]["value"][1])
            except OSError:
                pass  # not listening yet
            if all(expr in seen and ok(seen[expr]) for expr, ok in want.items()):
                break
            assert time.monotonic() < deadline, (
                f"Prometheus did not see the job's metrics in time: {seen}\n"
                f"targets: {_get_json(base + '/api/v1/targets')['data']['activeTargets']}"
            )
            time.sleep(1)

        # Every target of the job's file_sd file is scraped and up, with the file's labels. Each
        # target is scraped on its own schedule, so the last may come up a scrape interval after
        # the metrics above did: wait for it (bounded), then check.
        n_targets = len(json.loads(targets_file.read_text()))
        deadline = time.monotonic() + 60
        while len(ups := _query(base, 'up{job="rlhf_cluster"}')) < n_targets and time.monotonic() < deadline:
            time.sleep(1)
        assert len(ups) == n_targets and all(u["value"][1] == "1" for u in ups), (n_targets, ups)
        assert {u["metric"]["job_name"] for u in ups} == {cfg.name}
        assert {u["metric"]["pool"] for u in ups} >= {"generation", "learner", "reward", "driver"}

        # The real server loaded every alert rule of deploy/alerts.yml.
        groups = _get_json(base + "/api/v1/rules")["data"]["groups"]
        loaded = {r["name"] for g in groups for r in g["rules"]}
        defined = {r["alert"] for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]}
        assert loaded == defined

        # Every dashboard query is valid PromQL for this server (Grafana's variables filled in).
        for expr in _dashboard_exprs():
            concrete = expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$job", ".*")
            _query(base, concrete)

        # Every metric a panel plots has samples on the job's live /metrics endpoints (histogram
        # series by their _bucket/_sum/_count names); event-only counters need only be exported.
        names = {n for expr in _dashboard_exprs() for n in METRIC.findall(expr)}
        missing: set[str] = set()
        while True:
            body, n_bodies = _scrape_all(targets_file)
            samples, declared = _sample_names(body, cfg.name), _declared_names(body)
            missing = {n for n in names if n not in (declared if n in EVENT_COUNTERS else samples)}
            if not missing or time.monotonic() > deadline or "error" in outcome:
                break
            time.sleep(1)
        assert n_bodies == n_targets
        assert not missing, f"dashboard plots metrics no live endpoint has samples of: {sorted(missing)}"
        assert {"rlhf_generation_tokens_total", "rlhf_learner_tokens_total", "rlhf_staleness_steps_bucket",
                "rlhf_train_kl", "rlhf_correction_ess", "rlhf_weights_sync_seconds_bucket"} <= names

        # The job itself ran to its end while being scraped.
        thread.join(timeout=max(10.0, deadline - time.monotonic()))
        assert not thread.is_alive(), "the job did not finish"
        if "error" in outcome:
            raise outcome["error"]
        assert len(outcome["result"].rows) == cfg.train.total_steps
        rows = outcome["result"].rows
        # The periodic evaluation is in the rows of the steps it followed, and only there (after the
        # last step it is the final one, in eval.json).
        evaluated = [r["step"] for r in rows if "eval_accuracy" in r]
        assert evaluated == [2, 5]
        final = json.loads((run_dir / "eval.json").read_text())
        assert 0 <= final["pass@1_after"] <= final["pass@2_after"] <= 1
        assert all(0 <= r["eval_pass@1"] <= r["eval_pass@2"] <= 1 for r in rows if r["step"] in evaluated)
        assert all(0.0 <= r["busy_generation"] <= 1.0 and r["learner_wait_seconds"] >= 0 for r in rows)
        assert max(r["busy_generation"] for r in rows) > 0 and max(r["busy_reward"] for r in rows) > 0

        # The step trace, written by the CLI as an operator would, is trace-event JSON with a track
        # per actor and every actor kind's work in it, in the order the pipeline does it.
        out = tmp_path / "trace.json"
        done = CliRunner().invoke(app, ["trace", str(run_dir), "--out", str(out)])  # in this process: ~3 s less
        assert done.exit_code == 0, (done.output, done.exception)
        _check_trace(json.loads(out.read_text()), {u["metric"]["pool"] for u in ups}, cfg.train.total_steps)

        # samples.jsonl: per step the decoded text of what was trained on, which round-trips to the
        # stored token ids through the model's own tokenizer; the CLI prints a step of it.
        from transformers import AutoTokenizer

        logged = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
        consumed = {(c.step, c.sample_id) for c in outcome["result"].consumed}
        assert sorted({r["step"] for r in logged}) == list(range(cfg.train.total_steps))
        from rlhf_cluster.models.tiny_model import ensure_tiny_model

        tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
        for r in logged:
            assert (r["step"], r["sample_id"]) in consumed and r["response_ids"]
            assert r["response"] == tokenizer.decode(r["response_ids"]) and r["prompt"] == tokenizer.decode(r["prompt_ids"])
        printed = CliRunner().invoke(app, ["samples", str(run_dir), "--step", "2"])
        assert printed.exit_code == 0, (printed.output, printed.exception)
        step_two = [r for r in logged if r["step"] == 2]
        assert printed.output.count("--- step 2 |") == len(step_two) >= 4
        assert all(r["response"].splitlines()[0] in printed.output for r in step_two if r["response"].strip())
    finally:
        if job is not None:
            job.shutdown()  # a job still running ends with an actor error in its thread
        if thread is not None:
            thread.join(timeout=30)
        prom.terminate()
        try:
            prom.wait(timeout=15)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(timeout=15)
        log.close()
