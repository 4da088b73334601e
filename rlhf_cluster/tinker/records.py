"""The typed records the Tinker service hands its backends: a training datum, Adam's parameters, a
client's LoRA settings, a sampling request's settings and what sampling returns. The wire layer
(`wire`, `proto`) makes them from the SDK's requests; the learner ranks (`bank`) and the engines
take them, so no backend reads the SDK's JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Datum:
    """One training example: the model's input tokens and the loss's inputs, all of length N.

    `inputs` holds the SDK's `loss_fn_inputs`: `target_tokens` (int64; input position i predicts
    `target_tokens[i]`, no shift) and, per loss, `weights`, `logprobs` (the sampler's) and
    `advantages` (float32)."""

    tokens: np.ndarray
    inputs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class AdamParams:
    """The SDK's `AdamParams`, sent with every `optim_step` (there is no schedule on the server).
    `weight_decay` is decoupled (AdamW); `grad_clip_norm` 0 means no clipping."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass(frozen=True)
class LoraSpec:
    """A training client's adapter: its rank, its initialisation seed, and which layers it trains
    (the SDK's `train_attn`, `train_mlp`, `train_unembed`)."""

    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class SampleSpec:
    """A sampling request's settings. Stops are strings or token ids, never both; `prompt_logprobs`
    asks for the prompt's own log-probs too (the first is None: nothing predicts it)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class SampledSequence:
    """One sample: the tokens the engine drew (a stop string's tokens included), their log-probs,
    and why it ended: `"stop"` (a stop string, a stop token or end of sequence) or `"length"`."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


@dataclass(frozen=True)
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
