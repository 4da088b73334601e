"""JudgeWorker: a judge model (a `judge` source in `scoring.rewards`) on its own vLLM engine, in
the scoring pool's judge pool. It renders each sample's (or group's) judge prompt, lets the
engine reply greedily, and reads the replies into rewards (`rlhf_cluster/scoring/judge.py`).
A judge model that is a vision-language one gets each sample's images with its prompt."""

from __future__ import annotations

import time
from concurrent.futures import Future

import ray

from actors.workers._common import Worker
from actors.workers.settings import JudgeSettings
from rlhf_cluster.experience.build import group_rollouts
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.image_turns import count_placeholders, image_placeholder
from rlhf_cluster.generation.multimodal import image_token_id
from rlhf_cluster.job.images import has_vision
from rlhf_cluster.scoring.judge import (
    VerdictReader,
    judge_prompt_ids,
    render,
    render_group,
    shared_images,
    without_images,
)
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
            # data.max_images_per_prompt: a sample with more is not judged (dropped and counted).
            images=settings.images if has_vision(model_path) else None,
        )
        self.tokenizer = self.engine.tokenizer
        self.image_token = image_token_id(self.engine.engine)  # None: a text-only judge, shown no images
        self.max_images = settings.images.max_per_prompt
        self.placeholder = image_placeholder(self.tokenizer) if self.image_token is not None else ""
        self.reader = VerdictReader(
            source.name, source.verdict, source.on_error, source.max_failure_fraction, source.failure_window
        )
        self._counted = (0, 0, 0)

    def stats(self) -> dict[str, int]:
        r = self.reader
        return {"parsed": r.parsed, "unparseable": r.unparseable, "errors": r.errors}

    def prompt_ids(self, text: str, images: int = 0) -> list[int]:
        """The judge's prompt as its engine receives it (`judge_prompt_ids`), after `images` image parts."""
        return judge_prompt_ids(self.tokenizer, text, images, self.placeholder)

    def _units(self, items: list[JudgeItem]) -> list[tuple[str, tuple[bytes, ...], str, list[int]]]:
        """The judge's prompts: (text, images, prompt id, the items it judges), one per item or group."""
        s = self.source
        if not s.group:
            return [
                (render(s.template, prompt, answer, r.response_text), r.images, r.prompt_id, [i])
                for i, (r, prompt, answer) in enumerate(items)
            ]
        units = []
        by_sample = {r.sample_id: i for i, (r, _, _) in enumerate(items)}
        for group in group_rollouts([r for r, _, _ in items]).values():
            _, prompt, answer = items[by_sample[group[0].sample_id]]
            text = render_group(s.template, prompt, answer, [r.response_text for r in group])
            images = shared_images([r.images for r in group])
            units.append((text, images, group[0].prompt_id, [by_sample[r.sample_id] for r in group]))
        return units

    def _submit(self, text: str, images: tuple[bytes, ...]) -> Future:
        """One judge call: with the sample's images where the judge sees images; a prompt it
        cannot take fails this call only (its samples are dropped and counted)."""
        if images:  # the policy's placeholders out: each image is placed once, by the judge's template
            text = without_images(text, [self.placeholder])
        shown = images if self.image_token is not None else ()
        ids = self.prompt_ids(text, len(shown))
        failed: Future = Future()
        if len(shown) > self.max_images:
            failed.set_exception(ValueError(f"{len(shown)} images; the judge's engine takes {self.max_images}"))
        elif count_placeholders(ids, self.image_token) != len(shown):
            failed.set_exception(ValueError(f"the judge's prompt does not place its {len(shown)} image(s)"))
        else:
            return self.engine.submit_turn(ids, self.source.max_tokens, [], greedy=True, images=shown)
        return failed

    def judge(self, items: list[JudgeItem]) -> list[float | None]:
        """A reward per item's rollout, in order (None: not judged; the sample is dropped)."""
        began = time.time()
        units = self._units(items)
        futures = [self._submit(text, images) for text, images, _, _ in units]
        out: list[float | None] = [None] * len(items)
        for future, (_, _, prompt_id, members) in zip(futures, units):
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
