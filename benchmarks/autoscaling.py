"""The autoscaler on a 2-raylet cluster (issue 73): a job whose reward function slows down x4
halfway, run with `scaling.auto.reward` on and off, and a job whose generation is the bottleneck.

Every job is the demo's (`configs/demo.yaml`: the tiny Qwen2, arithmetic sums, GRPO, 16 prompts x
8 samples a step, 2 learner ranks) on two raylets of this machine (`benchmarks/_raylets.py`): the
learner on the head; generation, reward and reference workers on the second raylet, which holds
`bench_scoring` 4 (reward at most 3 + the reference) and `bench_generation` 2, so every grow is
held to what that raylet has left. The reward function (`benchmarks/_autoscaling_reward.py`) is
the verifier after a sleep per sample that a control file says; the benchmark rewrites the file
when the job's step `--steps`/2 is written, and every reward worker, those started later too,
reads it (at most every 50 ms).

- Case A, "reward slows x4 halfway": `--delay-ms` per sample, x4 from the halfway step, and
  `--a-prompts` x `--a-n` samples a step (3 x 16: few groups a step). Side `auto`
  (`scaling.auto.reward` on, 1..3 workers) and side `off` (the same block, disabled), back to
  back (order rotated per `--reps`). Steps per minute after the slowdown (the steps written
  after the switch, over the time from the switch to the last), their ratio auto/off (the
  headline, target >= 1.5), the reward pool's size at the start and end. Why few groups: at
  the demo's 16 x 8 the reward pool is already the short one before the slowdown and grows
  before it, so the ratio would measure a pool sized for the slow reward, not the controller's
  answer to the change (1.73x and 1.61x there, benchmarks/README.md); at 3 groups it grows only
  after the switch. (Before `b6afabe` the `CallCoalescer` also sent a backlog of groups as one
  call, so extra workers barely paid at 16 groups.) The sleep per sample is large beside the
  per-sample cost of the scoring path (~0.6-0.9 ms on 2 cores), which more workers on 2 cores
  do not parallelize.
- Case B, "generation is the bottleneck": no reward sleep, responses `--b-tokens` long (EOS
  ignored), `scaling.auto` on for generation (1..2) and reward (1..3): generation grows, reward
  does not.
- No oscillation: no pool is resized more than N = 2 times in any M = 1 minute (`N_RESIZES` in
  `M_SECONDS`). Why those: a pool changes at most once per `cooldown_s` (15 s here), and a change
  that reverses its last one waits `REVERSAL_COOLDOWNS` (3) cooldowns; with bounds 1..3 (or 1..2)
  any three changes of one pool include a reversal, so they span at least 15 + 45 = 60 s. More
  than 2 in a minute means the rule was broken; every reversal is listed as well.

Every `autoscaled` and `scaled` row of each job's events.jsonl goes into the JSON.

    .venv/bin/python -m benchmarks.autoscaling [--steps 400 --delay-ms 1.5 --b-steps 90 --reps 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks import _autoscaling_reward as reward
from benchmarks._jobs import run_job_quietly
from benchmarks._raylets import importable_env, two_raylets
from benchmarks._timing import rotated
from benchmarks.common import REPO, args_config, headline, machine_info, print_table, result_path, write_result
from rlhf_cluster.job.autoscale import REVERSAL_COOLDOWNS

TARGET = 1.5  # steps/min after the slowdown, auto / off
SLOWDOWN = 4.0
COOLDOWN_S = 15.0
N_RESIZES = 2  # no pool resized more than this many times...
M_SECONDS = (1 + REVERSAL_COOLDOWNS) * COOLDOWN_S  # ...within any window this long (60 s: M = 1 minute)
SECOND_RAYLET = {"bench_scoring": 4.0, "bench_generation": 2.0}
RESIZE_EVENTS = ("autoscaled", "scaled", "autoscale_failed", "pools_started")


# ---- the pure parts: what the rows and events say ------------------------------------------
def steps_per_minute(rows: list[dict], since: float, until: float | None = None) -> float | None:
    """Steps per minute of the rows written after wall time `since` (and up to `until`): their count
    over the time from `since` to the last of them (None: fewer than 2 such rows)."""
    times = [r["time"] for r in rows if r["time"] > since and (until is None or r["time"] <= until)]
    if len(times) < 2 or times[-1] <= since:
        return None
    return 60.0 * len(times) / (times[-1] - since)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def resize_times(events: list[dict]) -> dict[str, list[float]]:
    """Per pool, the wall times its size changed (its `scaled` rows)."""
    out: dict[str, list[float]] = {}
    for e in events:
        if e["event"] == "scaled":
            out.setdefault(e["pool"], []).append(e["time"])
    return out


def most_within(times: list[float], span_s: float) -> int:
    """The most of `times` that fall in one window [t, t + span_s)."""
    times = sorted(times)
    return max((sum(1 for u in times[i:] if u - t < span_s) for i, t in enumerate(times)), default=0)


def reversals(events: list[dict], pool: str) -> int:
    """How often a pool's size changed direction (grown then shrunk, or the other way)."""
    moves = [e["to"] - e["from"] for e in events if e["event"] == "autoscaled" and e["pool"] == pool]
    return sum(1 for a, b in zip(moves, moves[1:]) if (a > 0) != (b > 0))


def pool_sizes(events: list[dict]) -> tuple[dict[str, int], dict[str, int]]:
    """Every pool's size at the job's start (`pools_started`) and end (its last `scaled` row since)."""
    start = dict(next(e["sizes"] for e in events if e["event"] == "pools_started"))
    end = dict(start)
    for e in events:
        if e["event"] == "scaled":
            end[e["pool"]] = e["replicas"]
    return start, end


def oscillation(events: list[dict]) -> dict:
    """Per pool: resizes in all, the most in any `M_SECONDS`, reversals; and whether each stays within N."""
    per = {
        pool: {"resizes": len(ts), "most_in_window": most_within(ts, M_SECONDS), "reversals": reversals(events, pool)}
        for pool, ts in resize_times(events).items()
    }
    return {"pools": per, "ok": all(p["most_in_window"] <= N_RESIZES for p in per.values())}


# ---- the jobs --------------------------------------------------------------------------------
def auto_block(pools: dict[str, int]) -> dict:
    """`scaling.auto` turning on `pools` (pool -> its max_replicas), every one at the same thresholds."""
    common = {"min_replicas": 1, "window": 3, "grow_wait_s": 0.1, "busy_high": 0.7, "busy_low": 0.1}
    return {
        pool: {**common, "enabled": True, "max_replicas": most, "shrink_after_steps": 20, "cooldown_s": COOLDOWN_S}
        for pool, most in pools.items()
    }


def job_config(args: argparse.Namespace, case: str, side: str, run_dir: Path):
    """Case `a` (side `auto` or `off`) or `b`: the demo's job with this benchmark's overrides."""
    from rlhf_cluster.config import JobConfig

    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(name=f"bench-autoscaling-{case}-{side}-{os.getpid()}", run_dir=str(run_dir))
    cfg["model"]["cache_dir"] = args.cache_dir
    cfg["data"].update(eval_prompts=0, eval_every_steps=0)
    cfg["generation"]["resources"] = {"custom": {"bench_generation": 1}}
    cfg["scoring"].update(
        resources={"custom": {"bench_scoring": 1}},
        rewards=[{"type": "function", "function": "benchmarks._autoscaling_reward:arithmetic"}],
    )
    cfg["train"].update(total_steps=args.steps if case == "a" else args.b_steps, progress=False)
    cfg["checkpoint"] = {"every_steps": 1_000_000}
    cfg["metrics"] = {"enabled": False}
    if case == "a":
        cfg["train"]["prompts_per_step"] = args.a_prompts
        cfg["generation"]["sampling"]["n"] = args.a_n
        auto = auto_block({"reward": 3})
        auto["reward"]["enabled"] = side == "auto"
    else:
        cfg["generation"]["sampling"].update(max_new_tokens=args.b_tokens, ignore_eos=True)
        auto = auto_block({"generation": 2, "reward": 3})
    cfg["scaling"] = {"auto": auto}
    return JobConfig.model_validate(cfg)


def watch_halfway(metrics: Path, half: int, switch, done: threading.Event) -> None:
    """Call `switch()` once `metrics` (the job's metrics.jsonl) holds `half` rows, or never if `done` first."""
    while not done.is_set():
        try:
            rows = metrics.read_bytes().count(b"\n")
        except OSError:
            rows = 0
        if rows >= half:
            switch()
            return
        time.sleep(0.05)


def run_one(args: argparse.Namespace, control: Path, case: str, side: str, runs: Path) -> dict:
    """One job: its delay at the start, x`SLOWDOWN` from its halfway step (case a); its figures."""
    from rlhf_cluster.fileio import read_jsonl

    run_dir = runs / f"{case}-{side}"
    cfg = job_config(args, case, side, run_dir)
    delay = args.delay_ms / 1000 if case == "a" else 0.0
    reward.set_delay(control, delay)
    switched: list[float] = []

    def switch() -> None:
        reward.set_delay(control, delay * SLOWDOWN)
        switched.append(time.time())

    done = threading.Event()
    watcher = threading.Thread(
        target=watch_halfway, args=(run_dir / "metrics.jsonl", cfg.train.total_steps // 2, switch, done), daemon=True
    )
    began = time.time()
    if case == "a":
        watcher.start()
    try:
        result = run_job_quietly(cfg, args.verbose)
    finally:
        done.set()
    events = read_jsonl(run_dir / "events.jsonl").rows
    return figures(case, side, began, switched[0] if switched else None, result.rows, events)


def figures(case: str, side: str, began: float, switched: float | None, rows: list[dict], events: list[dict]) -> dict:
    """A job's figures: steps per minute before and after the switch, pool sizes, its resizes."""
    start, end = pool_sizes(events)
    first = rows[0]["time"] if rows else began
    after = switched if switched is not None else first
    keep = ("step", "time", "step_seconds", "learner_seconds", "learner_wait_seconds")
    return {
        "case": case,
        "side": side,
        "startup_seconds": first - began,
        "switched_at_step": sum(1 for r in rows if r["time"] <= switched) if switched else None,
        "steps_per_min_before": steps_per_minute(rows, first, switched) if switched else None,
        "steps_per_min_after": steps_per_minute(rows, after),
        "sizes_start": start,
        "sizes_end": end,
        "oscillation": oscillation(events),
        "events": [{**e, "t": e["time"] - after} for e in events if e["event"] in RESIZE_EVENTS],
        "rows": [
            {**{k: r.get(k) for k in keep}, **{k: v for k, v in r.items() if k.startswith("busy_")}} for r in rows
        ],
    }


# ---- the run ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="case A: learner steps per job (x4 from the halfway one)")
    p.add_argument("--delay-ms", type=float, default=1.5, help="case A: the reward's sleep per sample before halfway")
    p.add_argument("--a-prompts", type=int, default=3, help="case A: prompts per step (groups the reward pool gets)")
    p.add_argument("--a-n", type=int, default=16, help="case A: samples per prompt")
    p.add_argument("--reps", type=int, default=1, help="case A: jobs per side (order rotated)")
    p.add_argument("--b-steps", type=int, default=90, help="case B: learner steps")
    p.add_argument("--b-tokens", type=int, default=64, help="case B: tokens per response (EOS ignored)")
    p.add_argument("--cases", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models", help="tiny model cache")
    p.add_argument("--verbose", action="store_true", help="show the jobs' own lines")
    p.add_argument("--out", type=Path, default=result_path("autoscaling"), help="JSON results file")
    args = p.parse_args(argv)
    if args.steps < 4 or args.reps < 1:
        p.error("--steps must be >= 4 and --reps >= 1")
    return args


def run_jobs(args: argparse.Namespace) -> list[dict]:
    """Case A's sides (rotated per repetition), then case B, on one 2-raylet cluster."""
    sides = [("a", side, rep) for rep in range(args.reps) for side in rotated(("auto", "off"), rep)]
    plan = sides * ("a" in args.cases) + [("b", "auto", 0)] * ("b" in args.cases)
    work = Path(tempfile.mkdtemp(prefix="bench-autoscaling-"))
    control = work / "reward_delay"
    reward.set_delay(control, 0.0)
    os.environ[reward.ENV] = str(control)  # before the raylets start: every worker inherits it
    importable_env()
    jobs = []
    try:
        with two_raylets(SECOND_RAYLET, verbose=args.verbose):
            for i, (case, side, rep) in enumerate(plan):
                t0 = time.perf_counter()
                job = {"rep": rep, **run_one(args, control, case, side, work / str(i))}
                jobs.append({**job, "seconds": time.perf_counter() - t0})
                print(describe(job), flush=True)
                time.sleep(2)  # the ended job's actors' processes exit before the next starts
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return jobs


def describe(job: dict) -> str:
    pools = ", ".join(f"{p} {job['sizes_start'][p]}->{n}" for p, n in job["sizes_end"].items())
    rate = job["steps_per_min_after"]
    after = "after the slowdown" if job["case"] == "a" else "overall"
    moves = [
        f"{e['pool']} {e['from']}->{e['to']} at {e['t']:+.0f}s" for e in job["events"] if e["event"] == "autoscaled"
    ]
    return (
        f"  case {job['case']} {job['side']:4s}: {rate or 0:.1f} steps/min {after}; sizes {pools}; "
        f"autoscaled: {', '.join(moves) or 'none'}"
    )


def every(jobs: list[dict], test) -> bool | None:
    """Whether `test` holds for every job (None: no such job ran)."""
    return all(test(j) for j in jobs) if jobs else None


def grew(pool: str):
    return lambda job: job["sizes_end"][pool] > job["sizes_start"][pool]


def summary(jobs: list[dict]) -> dict:
    """The headline's ratio (medians of each side's steps/min after the slowdown) and the checks."""
    a = {side: [j for j in jobs if j["case"] == "a" and j["side"] == side] for side in ("auto", "off")}
    rate = {s: statistics.median(j["steps_per_min_after"] or 0.0 for j in js) if js else None for s, js in a.items()}
    b = [j for j in jobs if j["case"] == "b"]
    value = ratio(rate["auto"], rate["off"])
    # Within one repetition the two sides ran back to back: their ratio shares the machine's mood.
    by_rep = {(j["side"], j["rep"]): j["steps_per_min_after"] for j in a["auto"] + a["off"]}
    paired = [ratio(by_rep.get(("auto", r)), by_rep.get(("off", r))) for r in sorted({j["rep"] for j in a["auto"]})]
    checks = {
        "a_reward_grew": every(a["auto"], grew("reward")),
        "a_ratio_met": None if value is None else value >= TARGET,
        "b_generation_grew": every(b, grew("generation")),
        "b_reward_did_not_grow": every(b, lambda j: not grew("reward")(j)),
        "no_oscillation": every(jobs, lambda j: j["oscillation"]["ok"]),
    }
    return {"steps_per_min_after": rate, "ratio": value, "paired_ratios": paired, "checks": checks}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    jobs = run_jobs(args)
    total = time.perf_counter() - t0
    s = summary(jobs)
    print(f"\nautoscaling  2 raylets | demo job | N = {N_RESIZES} resizes per pool in any {M_SECONDS:.0f} s")
    print_table(
        ["case", "side", "steps/min before", "steps/min after", "sizes start", "sizes end", "most in M", "reversals"],
        [
            [
                j["case"],
                j["side"],
                j["steps_per_min_before"],
                j["steps_per_min_after"],
                str(j["sizes_start"]),
                str(j["sizes_end"]),
                str({p: v["most_in_window"] for p, v in j["oscillation"]["pools"].items()}),
                str({p: v["reversals"] for p, v in j["oscillation"]["pools"].items()}),
            ]
            for j in jobs
        ],
        ["{}", "{}", "{:.1f}", "{:.1f}", "{}", "{}", "{}", "{}"],
    )
    value = s["ratio"]
    paired = " ".join(f"{r or 0:.2f}" for r in s["paired_ratios"])
    print(f"steps/min after the slowdown, auto / off: {value or 0:.2f} (target >= {TARGET}; per repetition {paired})")
    print(f"checks: {s['checks']}")
    print(f"total {total:.0f} s")
    write_result(
        args.out,
        {
            "benchmark": "autoscaling",
            "machine": machine_info(),
            "config": {
                **args_config(args),
                "slowdown": SLOWDOWN,
                "cooldown_s": COOLDOWN_S,
                "oscillation_bound": {"n_resizes": N_RESIZES, "m_seconds": M_SECONDS},
                "second_raylet": SECOND_RAYLET,
                "job_configs": {c: job_config(args, c, "auto", Path("RUN_DIR")).model_dump() for c in args.cases},
            },
            "jobs": jobs,
            **s,
            "total_seconds": total,
            "headline": headline(
                "steps/min after the reward slows x4, autoscaling on / off", value, f">= {TARGET}x",
                None if value is None else value >= TARGET, "x",
            ),
        },
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    from benchmarks.common import run_script

    run_script(main)
