"""What a generation engine hands back besides rollouts: an episode's turn, a `generate` call's
counts, an in-place weight load's effect, and a finished response's text and finish reason as vLLM
gives them. Plain records, without vLLM or torch: the gateway and the episodes read them."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_cluster.experience.records import FinishReason


def response_text(tokenizer, token_ids: list[int]) -> str:
    """A finished response's text as vLLM's own detokenizer gives it: special tokens skipped,
    and the bytes of a character cut off by the token limit (decoded as U+FFFD) left out."""
    return tokenizer.decode(token_ids, skip_special_tokens=True).rstrip("\ufffd")


@dataclass
class Turn:
    """One model turn of a multi-turn episode: its tokens, their log-probs and weight-version spans
    (token indices within the turn), why it ended, its text, and the context as the engine held it
    (a vision-language model's images expanded to their tokens; else the context sent)."""

    token_ids: list[int]
    logprobs: list[float]
    spans: list[tuple[int, int]]
    finish_reason: FinishReason
    text: str
    context_ids: list[int] = field(default_factory=list)


@dataclass
class GenerationStats:
    """What one `generate` call did, for metrics."""

    prompts: int
    responses: int
    tokens: int
    seconds: float


@dataclass
class WeightSwap:
    """What one in-place weight load did to the requests in the engine."""

    version: int
    paused_seconds: float  # the engine loop stood still this long (reload + cache reset)
    resumed: int  # unfinished requests carried on with the new weights
    aborted: int  # unfinished requests dropped and started again (in_flight_update: abort)
    tokens_of_previous: int  # tokens this engine sampled with the version being replaced


def finish_reason(reason: str | None) -> FinishReason:
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop"
    return "abort"
