"""JudgeWorker: a judge model (a `judge` source in `scoring.rewards`) on its own vLLM engine, in
the scoring pool's judge pool. It renders each sample's (or group's) judge prompt, lets the
engine reply greedily, and reads the replies into rewards (`rlhf_cluster/scoring/judge.py`)."""

from __future__ import annotations

import time

import ray

from actors.workers._common import Worker
from actors.workers.settings import JudgeSettings
from rlhf_cluster.experience.build import group_rollouts
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.scoring.judge import VerdictReader, render, render_group
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.telemetry import tracing

JudgeItem = tuple[Rollout, str, str]  # a rollout, its prompt's text, its reference answer


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class JudgeWorker(Worker):
    """Judges rollouts with one judge model: `judge(items)` returns a reward per rollout, None
    for one the judge could not judge (dropped and counted), or raises `JudgeError` past the
    source's failure bounds (or at once with `on_error: fail`)."""

    def __init__(self, settings: JudgeSettings, model_path: str, index: int, slot: int | None = None):
        """`model_path`: the judge's folder (or its int8 copy); `slot`: unused."""
        super().__init__(settings.basics, "judge", f"judge{index}")
        self.source = source = settings.judge
        assert settings.engine.seed is not None  # JobConfig resolves every component seed when it validates
        self.engine = VLLMEngine(
            model_path,
            settings.engine,
            dtype=settings.engine_dtype,
            seed=settings.engine.seed + index,
            name=self.name,
            on_step=lambda running, waiting: self.stall.stepped(running + waiting),
        )
        self.tokenizer = self.engine.tokenizer
        self.reader = VerdictReader(
            source.name, source.verdict, source.on_error, source.max_failure_fraction, source.failure_window
        )
        self._counted = (0, 0, 0)

    def stats(self) -> dict[str, int]:
        r = self.reader
        return {"parsed": r.parsed, "unparseable": r.unparseable, "errors": r.errors}

    def prompt_ids(self, text: str) -> list[int]:
        """The judge's prompt as its engine receives it: the user turn of its chat template where
        its tokenizer has one, the text itself otherwise."""
        if getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(str(rendered), add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    def judge(self, items: list[JudgeItem]) -> list[float | None]:
        """A reward per item's rollout, in order (None: not judged; the sample is dropped)."""
        began = time.time()
        s = self.source
        units: list[tuple[list[int], str, list[int]]] = []  # (prompt ids, prompt id, the items it judges)
        if s.group:
            by_sample = {r.sample_id: i for i, (r, _, _) in enumerate(items)}
            for group in group_rollouts([r for r, _, _ in items]).values():
                first = by_sample[group[0].sample_id]
                _, prompt, answer = items[first]
                text = render_group(s.template, prompt, answer, [r.response_text for r in group])
                units.append((self.prompt_ids(text), group[0].prompt_id, [by_sample[r.sample_id] for r in group]))
        else:
            for i, (r, prompt, answer) in enumerate(items):
                units.append((self.prompt_ids(render(s.template, prompt, answer, r.response_text)), r.prompt_id, [i]))
        futures = [self.engine.submit_turn(ids, s.max_tokens, [], greedy=True) for ids, _, _ in units]
        out: list[float | None] = [None] * len(items)
        for future, (_, prompt_id, members) in zip(futures, units):
            try:
                reply: str | BaseException = future.result().text
            except Exception as exc:  # one judge call's failure costs its samples, as the policy says
                reply = exc
            value = self.reader.read(reply, prompt_id, choices=len(members))
            values = value if isinstance(value, list) else [value] * len(members)
            for index, v in zip(members, values):
                out[index] = v
        self._export()
        tracing.add("judge", began, time.time(), responses=len(items), prompts=len(units))
        return out

    def _export(self) -> None:
        r, (parsed, unparseable, errors) = self.reader, self._counted
        for outcome, now, before in (
            ("parsed", r.parsed, parsed),
            ("unparseable", r.unparseable, unparseable),
            ("error", r.errors, errors),
        ):
            if now > before:
                self.labels.of(m.SCORING_JUDGE_VERDICTS, outcome=outcome).inc(now - before)
        self._counted = (r.parsed, r.unparseable, r.errors)
