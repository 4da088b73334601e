"""The mismatch probe: fixed sequences scored by the learner and by every engine, per version.

The learner publishes its fp32 log-probs of the probe tokens with each weight version
(`probe.json` beside the shards). A generation worker that loads the version scores the same
tokens with its engine and reports how far apart the two are. The estimators match the
per-step correction diagnostics: with ``delta = log p_learner - log p_engine``,
``k1 = mean(-delta)`` and ``k3 = mean(exp(delta) - 1 - delta)``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.weights.messages import ProbeMismatch

PROBE_FILE = "probe.json"


@dataclass
class Probe:
    """Token ids of the probe sequences (prompt and response parts)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt_ids)


def build_probe(prompts: list[Prompt], tokenizer, count: int) -> Probe:
    """The first `count` prompts, each followed by its reference answer and EOS.

    Reference answers are the tokens a trained policy should put probability on, so the probe
    measures mismatch where it matters rather than on tokens no policy would sample.
    """
    chosen = prompts[:count]
    return Probe(
        prompt_ids=[p.encode(tokenizer) for p in chosen],
        response_ids=[tokenizer(p.answer)["input_ids"] + [tokenizer.eos_token_id] for p in chosen],
    )


def probe_file(probe: Probe, logprobs: list[list[float]]) -> str:
    """The text published with a version: the probe and the learner's log-probs of it."""
    return json.dumps({"prompt_ids": probe.prompt_ids, "response_ids": probe.response_ids, "logprobs": logprobs})


def parse_probe_file(text: str) -> tuple[Probe, list[list[float]]]:
    raw = json.loads(text)
    return Probe(raw["prompt_ids"], raw["response_ids"]), raw["logprobs"]


def mismatch(learner: list[list[float]], engine: list[list[float]]) -> ProbeMismatch:
    """k1, k3 and the largest |log-prob difference| over all probe tokens."""
    deltas = [a - b for row_a, row_b in zip(learner, engine) for a, b in zip(row_a, row_b)]
    if not deltas:
        return ProbeMismatch(k1=0.0, k3=0.0, max_abs_diff=0.0, tokens=0)
    return ProbeMismatch(
        k1=statistics.fmean(-d for d in deltas),
        k3=statistics.fmean(math.expm1(d) - d for d in deltas),
        max_abs_diff=max(abs(d) for d in deltas),
        tokens=len(deltas),
    )


@dataclass
class MismatchAlarm:
    """Flags a version whose probe k3 jumps: above `factor` x the median of the versions before it
    and above `floor` (fp32 engines sit near 1e-7, where relative jumps are noise)."""

    factor: float
    floor: float
    history: list[float] = field(default_factory=list)

    def observe(self, k3: float) -> bool:
        jump = bool(self.history) and k3 > self.floor and k3 > self.factor * statistics.median(self.history)
        self.history.append(k3)
        return jump
