"""Reporting: one row per step to `metrics.jsonl`, Prometheus and the console; the consumed
samples' provenance; the generation workers' probe reports; the rollout timeline."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from rlhf_cluster.config import JobConfig
from rlhf_cluster.experience.records import ScoredSample
from rlhf_cluster.generation.probe import MismatchAlarm
from rlhf_cluster.job.guardrails import GuardVerdict, policy_held
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.sample_log import pick_samples, sample_rows
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry.metrics import MetricLabels
from rlhf_cluster.telemetry.step_report import console_line, step_row
from rlhf_cluster.telemetry.tracing import Tracer
from rlhf_cluster.telemetry.trackers import Tracker, open_trackers
from rlhf_cluster.weights.messages import ProbeReport, Receipt

log = logging.getLogger(__name__)


@dataclass
class ConsumedSample:
    """Provenance of a sample the learner trained on (for tests and audits)."""

    step: int
    sample_id: str
    prompt_id: str
    policy_version: int
    worker: str
    policy_versions: list = field(default_factory=list)  # (first token, version) spans of the response
    rolled_back_steps: int = 0  # steps of its weights a rollback abandoned (a group scored before a resume)


def _evaluated(column: str, after: bool) -> property:
    """A read-only `JobResult` figure: `column` of the evaluation after (or before) training, None
    where that evaluation has none."""

    def read(result: JobResult) -> float | None:
        return (result.evaluation_after if after else result.evaluation_before).get(column)

    return property(read)


@dataclass
class JobResult:
    """What a finished job reports: per-step rows and every consumed sample."""

    rows: list[dict] = field(default_factory=list)
    consumed: list[ConsumedSample] = field(default_factory=list)
    final_version: int = 0
    # Held-out evaluation before and after training (`actors.evaluation.evaluate`): eval_reward_mean
    # and eval_accuracy (greedy), eval_sampled_reward_mean and eval_sampled_accuracy (data.eval_samples
    # answers per prompt), eval_pass@k (the accuracies where the reward says an answer is right); empty
    # without held-out prompts.
    evaluation_before: dict[str, float] = field(default_factory=dict)
    evaluation_after: dict[str, float] = field(default_factory=dict)
    run_dir: str = ""
    stopped: bool = False  # ended by `Job.stop` (or a signal) before the last step, with a checkpoint
    early_stop: str | None = None  # why the guardrails ended the run before the last step (checkpointed, evaluated)
    total_steps: int = 0  # the steps the job was to train (train.total_steps, or counted from train.total_epochs)

    accuracy_before = _evaluated("eval_accuracy", after=False)
    accuracy_after = _evaluated("eval_accuracy", after=True)
    sampled_accuracy_before = _evaluated("eval_sampled_accuracy", after=False)
    sampled_accuracy_after = _evaluated("eval_sampled_accuracy", after=True)
    reward_before = _evaluated("eval_reward_mean", after=False)
    reward_after = _evaluated("eval_reward_mean", after=True)
    sampled_reward_before = _evaluated("eval_sampled_reward_mean", after=False)
    sampled_reward_after = _evaluated("eval_sampled_reward_mean", after=True)


class Reporter:
    """Writes what the job did, where operators and tests read it; the driver's Prometheus labels."""

    def __init__(self, cfg: JobConfig, run_dir: RunDir):
        self.cfg, self.run_dir = cfg, run_dir
        self.labels = MetricLabels(job=cfg.name, pool="driver", worker="driver")
        self.labels.of(m.MISMATCH_ALERTS)  # exported at 0 from the start, so dashboards and rate() see it
        self.labels.of(m.STALENESS_BOUND).set(cfg.train.max_staleness)
        self.mismatch_alarm = MismatchAlarm(cfg.generation.probe.alert_factor, cfg.generation.probe.alert_floor)
        self.result = JobResult(run_dir=str(run_dir.root), total_steps=cfg.train.total_steps)
        self.bad_steps = 0
        # The driver's own track of the trace (an instance: several jobs may share a process).
        self.tracer = Tracer("driver", "driver") if cfg.metrics.trace else None
        self.tokenizer: Any = None  # set once the job's inputs are prepared: samples.jsonl decodes with it
        self.trace_full = False  # trace.jsonl reached metrics.trace_max_mb
        self.trackers: list[Tracker] | None = None  # TensorBoard, W&B: `open_trackers`, before the first evaluation

    def step(
        self,
        step: int,
        samples: list[ScoredSample],
        stats: dict,
        seconds: float,
        counters: dict,
        worker_of: dict[str, str],
    ) -> dict:
        """Record one learner step: its row everywhere, and the provenance of every sample it used."""
        self._check_bad_step(step, stats)
        row = step_row(step, samples, stats, seconds, counters)
        if self.tracer is not None:
            self.tracer.add("step", time.time() - seconds, time.time(), step=step)
            self.trace(self.tracer.drain())
        for s in samples:
            self.labels.of(m.STALENESS).observe(s.staleness(step))
        for column, gauge in m.STEP_GAUGES.items():
            if column in row:
                self.labels.of(gauge).set(row[column])
        for column, (gauge, extra) in m.STEP_LABELLED_GAUGES.items():
            if column in row:
                self.labels.of(gauge, **extra).set(row[column])
        for prefix, (gauge, label) in m.STEP_PREFIXED_GAUGES.items():
            for column in (c for c in row if c.startswith(prefix)):
                self.labels.of(gauge, **{label: column.removeprefix(prefix)}).set(row[column])
        consumed = [
            ConsumedSample(
                step,
                s.sample_id,
                s.prompt_id,
                s.policy_version,
                worker_of.pop(s.sample_id, "?"),
                [list(span) for span in s.version_spans],
                s.rolled_back_steps,
            )
            for s in samples
        ]
        self.result.rows.append(row)
        self.result.consumed.extend(consumed)
        self.run_dir.append(RunDir.METRICS, [row])
        for tracker in self.trackers or []:
            tracker.log(row, step)
        self.run_dir.append(RunDir.CONSUMED, [vars(c) for c in consumed])
        if self.tokenizer is not None:
            picked = pick_samples(samples, self.cfg.metrics.samples_top, self.cfg.metrics.samples_random, seed=step)
            self.run_dir.append(RunDir.SAMPLES, sample_rows(step, picked, self.tokenizer))
        log.info(console_line(row))
        return row

    def evaluation(self, prompts: int, version: int, samples_per_prompt: int) -> None:
        """Held-out reward and accuracy (None where the reward does not say whether an answer is right)
        before and after RL to `eval.json` (when the job has held-out prompts)."""
        r = self.result
        if r.reward_before is not None:
            self.run_dir.write_json(
                RunDir.EVAL,
                {
                    "prompts": prompts,
                    "accuracy_before": r.accuracy_before,
                    "accuracy_after": r.accuracy_after,
                    "version_after": version,
                    "samples_per_prompt": samples_per_prompt,
                    "sampled_accuracy_before": r.sampled_accuracy_before,
                    "sampled_accuracy_after": r.sampled_accuracy_after,
                    "reward_before": r.reward_before,
                    "reward_after": r.reward_after,
                    "sampled_reward_before": r.sampled_reward_before,
                    "sampled_reward_after": r.sampled_reward_after,
                    **{
                        f"{k.removeprefix('eval_')}_{when}": v
                        for when, e in (("before", r.evaluation_before), ("after", r.evaluation_after))
                        for k, v in e.items()
                        if k.startswith("eval_pass@")
                    },
                },
            )
        if r.rows and self.trackers:  # the final evaluation charts at the last step, after it
            for tracker in self.trackers:
                tracker.log(r.evaluation_after, r.rows[-1]["step"])

    def open_trackers(self, first_step: int) -> None:
        """TensorBoard and W&B (`metrics.tensorboard`, `metrics.wandb`), for a run whose next row is
        `first_step`'s: before the pools' watchers start (a W&B start may take seconds, online)."""
        self.trackers = open_trackers(self.cfg, self.run_dir.root, first_step)

    def close(self) -> None:
        """End the trackers' runs (a W&B run is marked finished; TensorBoard's files closed); a
        tracker that fails to close is logged, never raised: the job's own shutdown comes first."""
        for tracker in self.trackers or []:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - a tracker's trouble is not the job's
                log.warning("closing %s failed: %r", type(tracker).__name__, exc)
        self.trackers = []

    def keep_steps(self, last_step: int) -> None:
        """A resumed or rolled-back run continues from `last_step`: later rows are forgotten."""
        self.run_dir.keep_steps(last_step)
        for tracker in self.trackers or []:
            tracker.rewind(last_step + 1)
        self.result.rows = [r for r in self.result.rows if r["step"] <= last_step]
        self.result.consumed = [c for c in self.result.consumed if c.step <= last_step]

    def _check_bad_step(self, step: int, stats: dict) -> None:
        """A step whose loss was NaN/inf was skipped by the learner or the critic; too many in a row
        end the job. A critic warm-up step (the policy held) is judged by the critic's alone, and a
        good one leaves the count as it is (the policy made no update to judge)."""
        held = policy_held(stats)
        if not (stats.get("critic/skipped_updates") or (not held and stats.get("learner/skipped_updates"))):
            if not held:
                self.bad_steps = 0
            return
        self.bad_steps += 1
        self.labels.of(m.BAD_STEPS).inc()
        log.info(f"step {step}: non-finite loss or gradient, update skipped ({self.bad_steps} in a row)")
        if self.bad_steps >= self.cfg.faults.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_steps} consecutive steps had a NaN/inf loss or gradient (faults.max_bad_steps); stopping"
            )

    def dropped(self, reason: str, samples: int) -> None:
        if samples:
            self.labels.of(m.BUFFER_DROPPED, reason=reason).inc(samples)

    def buffer_depth(self, depth: int) -> None:
        self.labels.of(m.BUFFER_DEPTH).set(depth)

    def span(self, name: str, **args):
        """A span of the driver's track (nothing when tracing is off)."""
        return self.tracer.span(name, **args) if self.tracer is not None else contextlib.nullcontext()

    def trace(self, spans: list[dict]) -> None:
        """Keep trace spans (the actors', arriving with heartbeats, and the driver's) in trace.jsonl,
        until it reaches `metrics.trace_max_mb` (~35 spans of ~130 bytes a step on the demo)."""
        if not spans or self.trace_full:
            return
        path = self.run_dir / RunDir.TRACE
        if path.exists() and path.stat().st_size > self.cfg.metrics.trace_max_mb << 20:
            self.trace_full = True
            log.warning(
                "%s reached metrics.trace_max_mb=%d: no more spans are kept", path, self.cfg.metrics.trace_max_mb
            )
            return
        self.run_dir.append(RunDir.TRACE, spans)

    def learner_ranks(self, world_size: int) -> None:
        self.labels.of(m.LEARNER_RANKS).set(world_size)

    def version(self, version: int) -> None:
        self.labels.of(m.LEARNER_VERSION).set(version)

    def restart(self, pool: str, worker: str) -> None:
        m.RESTARTS.labels(job=self.cfg.name, pool=pool, worker=worker).inc()

    def guardrails(self, verdict: GuardVerdict) -> None:
        """An evaluation the guardrails acted on (a best checkpoint kept, an early stop): a row of
        events.jsonl, the actions counter, and a line on the console for a stop."""
        actions = (["best"] if verdict.improved and self.cfg.guardrails.keep_best else []) + (
            ["stop"] if verdict.stop else []
        )
        if not actions:
            return
        for action in actions:
            self.labels.of(m.GUARDRAIL_ACTIONS, action=action).inc()
        self.run_dir.append(
            RunDir.EVENTS,
            [
                {
                    "step": verdict.step,
                    "event": "guardrails",
                    "actions": actions,
                    "metric": self.cfg.guardrails.metric,
                    "value": verdict.value,
                    "reason": verdict.stop,
                    "time": time.time(),
                }
            ],
        )
        if verdict.stop:
            log.info(f"stopping early: {verdict.stop}")

    def rollback(self, at_step: int, to_step: int, reason: str, cfg: JobConfig) -> None:
        """A guardrails rollback done: the run continues after `to_step` (-1: from the start) with
        `cfg`'s adjusted settings. Its row in events.jsonl carries the step it continues from, so a
        later resume that keeps that step keeps the row."""
        self.labels.of(m.GUARDRAIL_ACTIONS, action="rollback").inc()
        self.run_dir.append(
            RunDir.EVENTS,
            [
                {
                    "step": to_step,
                    "event": "guardrails",
                    "actions": ["rollback"],
                    "at_step": at_step,
                    "reason": reason,
                    "lr": cfg.learner.lr,
                    "kl_coef": cfg.algorithm.kl.coef,
                    "time": time.time(),
                }
            ],
        )
        log.info(
            f"rolling back: {reason}; continuing after step {to_step} with learner.lr {cfg.learner.lr:g}, "
            f"algorithm.kl.coef {cfg.algorithm.kl.coef:g}"
        )

    def checkpoint_failed(self) -> None:
        self.labels.of(m.CHECKPOINT_FAILURES).inc()

    def group_buffered(
        self, samples: list[ScoredSample], worker: str, requested_at: float, generated_at: float
    ) -> None:
        """One timeline row per buffered group: when it was requested, generated (and handed to
        scoring) and buffered, and the version spans of its responses."""
        self.run_dir.append(
            RunDir.TIMELINE,
            [
                {
                    "group_id": samples[0].group_id,
                    "worker": worker,
                    "requested_at": requested_at,
                    "generated_at": generated_at,
                    "buffered_at": time.time(),
                    "policy_versions": [[list(span) for span in s.version_spans] for s in samples],
                }
            ],
        )

    def receipts(self, receipts: list[Receipt]) -> None:
        """Every engine's answer to a weight load, in receipts.jsonl: the version it serves, whether
        that is proven and by whose declaration (`Receipt.proven_by`: the sender's fingerprint, or
        the store's own manifest), and the post-load probes riding on them."""
        self.run_dir.append(
            RunDir.RECEIPTS,
            [
                {
                    "worker": r.worker,
                    "version": r.version,
                    "variant": r.variant,
                    "status": r.status,
                    "proven": r.proven,
                    "proven_by": r.proven_by,
                    "fingerprint": (r.fingerprint or "")[:16],
                    "time": time.time(),
                }
                for r in receipts
            ],
        )
        probes = [r.probe for r in receipts if r.probe is not None]
        if probes:
            self.probes(probes)

    def probes(self, reports: list[ProbeReport]) -> None:
        """Log each worker's post-load probe mismatch (probes.jsonl) and alert when it jumps."""
        records = []
        for report in reports:
            alert = self.mismatch_alarm.observe(report.mismatch.k3)
            if alert:
                self.labels.of(m.MISMATCH_ALERTS).inc()
                log.warning(
                    "rollout mismatch jumped: %s version %d probe k3 %.3g (max |dlogp| %.3g), median so far %.3g",
                    report.worker,
                    report.version,
                    report.mismatch.k3,
                    report.mismatch.max_abs_diff,
                    statistics.median(self.mismatch_alarm.history[:-1]),
                )
            records.append({**report.record(), "alert": alert})
        self.run_dir.append(RunDir.PROBES, records)
