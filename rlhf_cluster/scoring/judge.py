"""LLM-as-judge rewards (a `judge` source in `scoring.rewards`): the judge's prompt is a template
around the sample, the judge model's reply a verdict parsed into a number.

Pure: what a judge worker renders and parses, and how its numbers join the other sources'. The
judge model itself runs in the scoring pool's judge workers (`actors/workers/judge.py`, a vLLM
engine, greedy).

- A template names the sample's parts as `{prompt}`, `{response}`, `{answer}`, and for a judge of
  whole groups `{responses}` (numbered `[1] ...`, `[2] ...`) instead of `{response}`. A built-in
  template goes by its name (`TEMPLATES`); a one-word template that names none is refused naming the
  nearest.
- A verdict parser turns the reply into the reward: `score_0_10` (the last number 0-10 in the
  reply, divided by 10), `yes_no` (the reply's first word: yes/correct/true is 1, no/wrong/
  incorrect/false is 0), `choice` (group judging: the number of the best response; it gets 1, the
  others 0).
- A reply no parser can read, or a judge call that failed, is a failed sample: never scored 0
  silently. It is dropped like a failed reward function's sample (`reward_failed`), counted, and
  the source's `on_error` and failure bounds decide when the job stops (`user_code.FailureRate`).
- A judge that is itself a vision-language model sees the sample's images (`Rollout.images`;
  a group's shared ones): its prompt is one user turn of the images, then the rendered template
  (`judge_prompt_ids`); the image placeholders of the policy's own prompt text are taken out of
  it (`without_images`), so each image is placed once, by the judge's template. A text-only judge
  gets no images and the text without the placeholders.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Sequence
from typing import Any

VERDICTS = ("score_0_10", "yes_no", "choice")
TEMPLATES = {
    "correctness": (
        "Question: {prompt}\nReference answer: {answer}\nResponse: {response}\n"
        "Is the response's final answer correct? Reply with yes or no.\nVerdict:"
    ),
    "score": (
        "Question: {prompt}\nReference answer: {answer}\nResponse: {response}\n"
        "Rate the response from 0 (wrong) to 10 (fully correct). Reply with the number alone.\nScore:"
    ),
    "best_of_group": (
        "Question: {prompt}\nReference answer: {answer}\nResponses:\n{responses}\n"
        "Which response is best? Reply with its number alone.\nBest:"
    ),
}
JUDGE_FAILED = "judge_failed"  # a component: 1 for a sample whose verdict could not be had
_YES = {"yes", "correct", "true", "right"}
_NO = {"no", "wrong", "incorrect", "false"}
_WORD = re.compile(r"[a-z]+")
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?![\d.])")
_NAME = re.compile(r"\s*[A-Za-z_][\w-]*\s*")  # one word: meant as a built-in template's name


def template_text(template: str) -> str:
    """A built-in template's text by name, or the template itself."""
    return TEMPLATES.get(template, template)


def check_template(template: str, group: bool) -> str:
    """The template's text, or a ValueError naming what it lacks or what it names that no sample has."""
    text = template_text(template)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise ValueError(f"template: {exc} (a literal brace is written twice: {{{{ or }}}})") from None
    allowed = {"prompt", "answer", "responses" if group else "response"}
    if not fields and _NAME.fullmatch(text):
        raise ValueError(_not_a_builtin(template, allowed))
    unknown = sorted(fields - allowed)
    if unknown:
        raise ValueError(
            f"template names {', '.join('{' + u + '}' for u in unknown)}; "
            f"{'a group' if group else 'a per-sample'} judge's template may use "
            + ", ".join("{" + a + "}" for a in sorted(allowed))
        )
    needed = "responses" if group else "response"
    if needed not in fields:
        raise ValueError(f"template must include {{{needed}}}: the judge has to see what it judges")
    return text


def _not_a_builtin(name: str, allowed: set[str]) -> str:
    """What to say of a one-word template that names no built-in: the built-ins, the nearest one,
    and what a template of one's own looks like."""
    nearest = difflib.get_close_matches(name.strip(), TEMPLATES, n=1)
    return (
        f"template {name!r} is not a built-in template (built-ins: {', '.join(sorted(TEMPLATES))})"
        + (f"; did you mean {nearest[0]!r}?" if nearest else ".")
        + " A template of your own is text naming "
        + ", ".join("{" + a + "}" for a in sorted(allowed))
    )


def render(template: str, prompt: str, answer: str, response: str) -> str:
    """A per-sample judge's prompt."""
    return template_text(template).format(prompt=prompt, answer=answer, response=response)


def render_group(template: str, prompt: str, answer: str, responses: Sequence[str]) -> str:
    """A group judge's prompt: the group's responses numbered from 1."""
    listed = "\n".join(f"[{i}] {r}" for i, r in enumerate(responses, start=1))
    return template_text(template).format(prompt=prompt, answer=answer, responses=listed)


# How vision-language chat templates place an image in prompt text (Qwen2-VL and its successors,
# LLaVA): the policy's prompt text holds these where its images are.
IMAGE_MARKUP = ("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>", "<image>")


def without_images(text: str, placeholders: Sequence[str] = ()) -> str:
    """`text` without image placeholders (`IMAGE_MARKUP` and `placeholders`, longest first)."""
    for mark in sorted({*IMAGE_MARKUP, *placeholders}, key=len, reverse=True):
        if mark:
            text = text.replace(mark, "")
    return text


def shared_images(images: Sequence[Sequence[bytes]]) -> tuple[bytes, ...]:
    """The images every one of a group's samples has, in order (their common first images: the
    prompt's; an episode's later images differ between samples)."""
    if not images:
        return ()
    out: list[bytes] = []
    for column in zip(*images):
        if any(i != column[0] for i in column):
            break
        out.append(column[0])
    return tuple(out)


def judge_prompt_ids(tokenizer: Any, text: str, images: int = 0, placeholder: str = "") -> list[int]:
    """The judge's prompt as its engine receives it: one user turn of its chat template (its
    `images` first, as image parts), or without a template the text itself after `images`
    copies of the image `placeholder`."""
    if getattr(tokenizer, "chat_template", None):
        content: Any = [{"type": "image"}] * images + [{"type": "text", "text": text}] if images else text
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(str(rendered), add_special_tokens=False)["input_ids"])
    return list(tokenizer(placeholder * images + text)["input_ids"])


def parse_verdict(verdict: str, reply: str, choices: int = 0) -> float | list[float] | None:
    """The reward a reply means under `verdict` (`choice`: one per response of the group), or None
    when the reply holds no verdict that parser reads."""
    if verdict == "yes_no":
        for word in _WORD.findall(reply.lower()):
            if word in _YES:
                return 1.0
            if word in _NO:
                return 0.0
        return None
    numbers = [float(n) for n in _NUMBER.findall(reply)]
    if verdict == "score_0_10":
        scores = [n for n in numbers if 0.0 <= n <= 10.0]
        return scores[-1] / 10.0 if scores else None
    if verdict == "choice":
        picked = next((int(n) for n in numbers if n.is_integer() and 1 <= n <= choices), None)
        return None if picked is None else [1.0 if i == picked else 0.0 for i in range(1, choices + 1)]
    raise ValueError(f"verdict: expected one of {', '.join(VERDICTS)}, got {verdict!r}")


def with_judge(
    scores: list[tuple[float, dict[str, float]]], judged: list[float | None], weight: float, name: str
) -> tuple[list[tuple[float, dict[str, float]]], dict[str, float]]:
    """The other sources' `(reward, components)` per sample with the judge's added:
    `reward + weight x judge`, the judge's value as component `judge/<name>`. A sample the judge
    could not judge (None) gets the failed reward (`reward_failed`, `judge_failed`); one whose other
    sources failed stays failed. Metrics: the judged share and the judge's mean."""
    from rlhf_cluster.scoring.rewards import FAILED

    if len(scores) != len(judged):
        raise ValueError(f"{len(judged)} verdicts for {len(scores)} samples")
    out: list[tuple[float, dict[str, float]]] = []
    for (reward, components), value in zip(scores, judged):
        if value is None:
            out.append((0.0, {**components, FAILED: 1.0, JUDGE_FAILED: 1.0}))
        else:
            out.append((reward + weight * value, {**components, f"judge/{name}": value, JUDGE_FAILED: 0.0}))
    values = [v for v in judged if v is not None]
    metrics = {
        "judge/judged_fraction": len(values) / max(len(judged), 1),
        "judge/mean": sum(values) / len(values) if values else 0.0,
    }
    # Beside a rule (a verifier recorded at weight 0, say): how often the two agree at 0.5.
    pairs = [(v, c["rule"]) for (_, c), v in zip(scores, judged) if v is not None and "rule" in c]
    if pairs:
        metrics["judge/agreement_with_rule"] = sum((v >= 0.5) == (r >= 0.5) for v, r in pairs) / len(pairs)
    return out, metrics


class JudgeError(RuntimeError):
    """The judge failed with `on_error: fail`, or more often than its failure bounds allow."""


class VerdictReader:
    """Reads a judge worker's replies into rewards and keeps its counts: `parsed`, `unparseable`
    (a reply no parser reads), `errors` (a judge call that failed). A failure is None (the sample
    is dropped), or with `on_error: fail`, or past the failure bounds, a `JudgeError` naming the
    judge, the prompt and the reply."""

    def __init__(
        self,
        name: str,
        verdict: str,
        on_error: str = "drop",
        max_failure_fraction: float = 0.5,
        failure_window: int = 200,
    ):
        from rlhf_cluster.scoring.rewards import BROKEN_AFTER
        from rlhf_cluster.user_code import FailureRate

        if verdict not in VERDICTS:
            raise ValueError(f"verdict: expected one of {', '.join(VERDICTS)}, got {verdict!r}")
        self.name, self.verdict, self.on_error = name, verdict, on_error
        where = f"judge {name!r} (scoring.rewards)"
        self.failures = FailureRate(where, max_failure_fraction, failure_window, BROKEN_AFTER)
        self.parsed = self.unparseable = self.errors = 0

    def read(self, reply: str | BaseException, prompt_id: str, choices: int = 0) -> float | list[float] | None:
        """One reply (or the exception its call raised) as its reward(s), or None when it failed."""
        if isinstance(reply, BaseException):
            self.errors += 1
            self._failed(f"prompt {prompt_id!r}: the judge call failed: {type(reply).__name__}: {reply}")
            return None
        value = parse_verdict(self.verdict, reply, choices)
        if value is None:
            self.unparseable += 1
            self._failed(f"prompt {prompt_id!r}: no {self.verdict} verdict in the reply {reply[:200]!r}")
            return None
        self.parsed += 1
        self.failures.ok()
        return value

    def _failed(self, cause: str) -> None:
        if self.on_error == "fail":
            raise JudgeError(f"judge {self.name!r} failed on {cause} (on_error: fail; `drop` drops such samples)")
        broken = self.failures.failed(cause)
        if broken is not None:
            raise JudgeError(broken)
