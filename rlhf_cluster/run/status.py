"""What `rlhf-cluster status RUN_DIR` prints: a run directory read back as an operator asks of it.

Whether a job holds the directory now, how far it trained, its held-out accuracy, which
checkpoints it keeps (the newest, and the best by the guardrails' metric), each pool's size (auto,
pinned by hand or fixed, and the autoscaler's last reason) and every action the guardrails took
on their own (a best checkpoint kept, a rollback, an early stop), from the run's own files only:
it works on a finished, stopped or killed run as on a live one.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_cluster.config import JobConfig
from rlhf_cluster.run.checkpoint import CheckpointStore, best_checkpoints
from rlhf_cluster.run.lock import holder
from rlhf_cluster.run.replay import recorded_config
from rlhf_cluster.run.run_dir import FAILED, RunDir


def describe_run(root: Path) -> list[str]:
    """The status lines of the run in `root`; `FileNotFoundError` when `root` holds no run."""
    if not (root / RunDir.CONFIG).exists() and (root / RunDir.EVENTS).exists():  # a job that failed at its start
        events = RunDir(root, root / "weights", root / "checkpoints").read(RunDir.EVENTS)
        return [f"run: {root} (no {RunDir.CONFIG}: the job ended before it wrote one)", _state(holder(root), events)]
    cfg = recorded_config(root)
    run = RunDir(root, cfg.weights_dir, cfg.checkpoint_dir)
    lines = [f"run: {cfg.name} ({root})"]
    every_event = run.read(RunDir.EVENTS)
    rows = run.read(RunDir.METRICS)
    trained = rows[-1]["step"] + 1 if rows else 0
    lines.append(_state(holder(root), every_event, (trained, cfg.train.total_steps)))
    if rows:
        last = rows[-1]
        lines.append(
            f"steps: {len(rows)} of {cfg.train.total_steps} (last: step {last['step']}, weight version "
            f"{last.get('weight_version')}, reward {last.get('reward_mean', float('nan')):+.3f})"
        )
    else:
        lines.append(f"steps: none of {cfg.train.total_steps} yet")
    lines += _held_out(_read_json(root / RunDir.EVAL) or {})
    lines.append(_checkpoints(cfg))
    lines += describe_pools(every_event)
    events = [e for e in every_event if e.get("event") == "guardrails"]
    lines.append(f"guardrail actions: {len(events) or 'none'}")
    lines += [f"  {_describe_event(e)}" for e in events]
    return lines


def _held_out(evaluation: dict) -> list[str]:
    """eval.json's figures before -> after: accuracy, or the reward where the reward does not say
    which answers are right (no accuracy measured); none without a held-out evaluation. A figure
    an evaluation lacks (every reward failed in it) is n/a."""
    what = "accuracy" if evaluation.get("accuracy_before") is not None else "reward"
    if evaluation.get(f"{what}_before") is None:
        return []

    def moved(prefix: str) -> str:
        before, after = (evaluation.get(f"{prefix}{what}_{when}") for when in ("before", "after"))
        return " -> ".join("n/a" if x is None else f"{x:.3f}" for x in (before, after))

    sampled = f", sampled {moved('sampled_')}" if evaluation.get(f"sampled_{what}_before") is not None else ""
    return [f"held-out {what}: greedy {moved('')}{sampled} ({evaluation.get('prompts')} prompts)"]


def _state(live: dict | None, events: list[dict], steps: tuple[int, int] | None = None) -> str:
    """Running (a job holds the directory), failed (the last event is a job's failure: a later
    start or resume writes rows after it), finished (`steps`: trained, of the job's total; or
    stopped early by the guardrails) or not running (stopped or killed)."""
    if live:
        return (
            f"state: running: job {live.get('job')!r}, pid {live.get('pid')} on {live.get('host')}, "
            f"started {live.get('started_at')}"
        )
    if events and events[-1].get("event") == FAILED:
        return f"state: failed ({events[-1].get('error')})"
    if steps is not None and steps[0] >= steps[1]:
        return f"state: finished ({steps[1]} steps)"
    stops = [e for e in events if e.get("event") == "guardrails" and "stop" in e.get("actions", ())]
    if stops and steps is not None and stops[-1].get("step", -1) + 1 >= steps[0]:
        return f"state: finished early at step {stops[-1]['step']} ({stops[-1].get('reason')})"
    return "state: not running"


def describe_pools(events: list[dict]) -> list[str]:
    """Each pool's size since the pools last started (events.jsonl's `pools_started`, then every
    `scaled`), whether the autoscaler sizes it (`auto`), an operator pinned it (`pinned`: a manual
    `scale` of an auto pool, until `scale --auto`) or neither (`fixed`), its warm spares, and the
    autoscaler's last decision."""
    starts = [i for i, e in enumerate(events) if e.get("event") == "pools_started"]
    if not starts:
        return []  # a run from before the autoscaler, or whose pools never started
    start = events[starts[-1]]
    sizes, auto, spares = dict(start.get("sizes", {})), set(start.get("auto", [])), start.get("spares", {})
    pinned: set[str] = set()
    last: dict[str, dict] = {}
    for e in events[starts[-1] + 1 :]:
        kind, pool = e.get("event"), str(e.get("pool"))
        if kind == "scaled":
            sizes[pool] = e.get("replicas", sizes.get(pool))
            if e.get("source", "manual") == "manual":
                pinned.add(pool)
        elif kind == "scale_released":
            pinned.discard(pool)
        elif kind in ("autoscaled", "autoscale_failed"):
            last[pool] = e
    lines = ["pools:"]
    for pool, size in sizes.items():
        mode = (
            "pinned (rlhf-cluster scale; --auto releases it)"
            if pool in pinned and pool in auto
            else ("auto" if pool in auto else "fixed")
        )
        spare = f" + {spares[pool]} spare{'s' if spares[pool] != 1 else ''}" if spares.get(pool) else ""
        text = f"  {pool}: {size} worker{'s' if size != 1 else ''}{spare}, {mode}"
        if pool in last:
            e = last[pool]
            text += (
                f"; last decision {e.get('from')} -> {e.get('to')}: {e.get('reason')}"
                if e["event"] == "autoscaled"
                else f"; last resize to {e.get('to')} failed: {e.get('error')}"
            )
        lines.append(text)
    return lines


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _checkpoints(cfg: JobConfig) -> str:
    store = CheckpointStore(cfg.checkpoint_dir)
    kept = store.list()
    if not kept:
        return "checkpoints: none"
    text = f"checkpoints: {len(kept)} kept, newest {kept[-1].name}"
    scored = {path.name: score for path in kept if (score := store.score(path)) is not None}
    if scored:
        best = best_checkpoints(scored, 1, cfg.guardrails.higher_is_better).pop()
        text += f"; best by {cfg.guardrails.metric}: {best} ({scored[best]:.3f})"
    return text


def _describe_event(event: dict) -> str:
    actions = event.get("actions", [])
    if "rollback" in actions:
        to = event["step"]
        return (
            f"step {event.get('at_step')}: rolled back ({event.get('reason')}); continued after "
            f"{'the start' if to < 0 else f'step {to}'} with learner.lr {event.get('lr'):g}, "
            f"algorithm.kl.coef {event.get('kl_coef'):g}"
        )
    parts = []
    if "best" in actions:
        parts.append(f"best checkpoint kept ({event.get('metric')} = {event.get('value'):.3f})")
    if "stop" in actions:
        parts.append(f"early stop ({event.get('reason')})")
    return f"step {event.get('step')}: " + "; ".join(parts or actions)
