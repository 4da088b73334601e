"""Sampling for the Tinker service on a generation engine: `n` samples of one prompt on the base
model or on a sampler's LoRA adapter (`adapter_library`), with the log-probs of the sampled tokens,
stop strings or stop tokens, and optionally the prompt's own log-probs.

A request goes through the engine's own loop (`EngineLoop._submit`), as `submit_turn` does, so
samples share engine steps with everything else in flight, and requests on different adapters
share them too (vLLM runs up to `max_loras` adapters in one step). The returned tokens are exactly
those the engine drew: a stop string's tokens and a stop or end-of-sequence token are kept
(`include_stop_str_in_output`), with one log-prob each. Those log-probs are the engine's
(`processed_logprobs`: after temperature, top-k and top-p, the probabilities the tokens were
drawn with); prompt log-probs are the model's own (vLLM applies no sampling settings to them).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.generation.adapter_library import AdapterLibrary, OnAdapter

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

    from rlhf_cluster.generation.engine import VLLMEngine


class SampleSettings(Protocol):
    """What a sampling request sets: the Tinker service's `tinker.records.SampleSpec` (read here by
    its fields: the Tinker folder imports this one, not the other way round)."""

    @property
    def max_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop_strings(self) -> tuple[str, ...]: ...
    @property
    def stop_token_ids(self) -> tuple[int, ...]: ...
    @property
    def prompt_logprobs(self) -> bool: ...


GREEDY_BELOW = 1e-5  # vLLM samples greedily below this temperature (its _SAMPLING_EPS)


@dataclass(frozen=True)
class Sample:
    """One sample as `tinker.records.SampledSequence` has it: the tokens drawn, their log-probs,
    and `"stop"` (stop string, stop token, end of sequence) or `"length"`."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


@dataclass(frozen=True)
class Samples:
    """A request's samples and, when asked, the prompt's log-probs (the first None), as
    `tinker.records.SampleResult` has them."""

    sequences: list[Sample]
    prompt_logprobs: list[float | None] | None = None


def sampling_config(cfg: GenerationConfig, library: AdapterLibrary) -> GenerationConfig:
    """`cfg` for an engine that serves `library`'s adapters (its LoRA settings among the engine
    arguments). Such an engine takes no `adapters` slot: the RL job's engines keep theirs."""
    clash = sorted(set(cfg.engine_kwargs) & set(library.engine_args()))
    if clash:
        raise ValueError(f"generation.engine_kwargs sets {clash}, which the adapter library sets for a sampling engine")
    return cfg.model_copy(update={"engine_kwargs": {**cfg.engine_kwargs, **library.engine_args()}})


def sampling_params(n: int, spec: SampleSettings):
    """vLLM's settings for `n` samples with `spec`: one request, vLLM fanning out the `n` (each
    its own seed, `seed + k`, when `spec.seed` is set)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if spec.stop_strings and spec.stop_token_ids:
        raise ValueError("a sampling request stops at strings or at token ids, not both")
    return SamplingParams(
        n=n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        top_k=0 if spec.top_k < 0 else spec.top_k,  # Tinker's -1 and vLLM's 0: no top-k
        seed=spec.seed,
        max_tokens=spec.max_tokens,
        stop=list(spec.stop_strings) or None,
        stop_token_ids=list(spec.stop_token_ids) or None,
        include_stop_str_in_output=True,
        # Text only to find stop strings in: without them vLLM skips its per-token detokenizing.
        detokenize=bool(spec.stop_strings),
        logprobs=0,
        prompt_logprobs=0 if spec.prompt_logprobs else None,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def stop_reason(reason: str | None) -> str:
    """Tinker's stop reason for vLLM's finish reason: a stop string, a stop token and the end of
    sequence are all `"stop"`."""
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"a sample ended without finishing (vLLM's finish reason {reason!r})")


def sample_result(output, prompt_ids: Sequence[int], spec: SampleSettings) -> Samples:
    """The `Samples` of one finished vLLM request (`sampling_params`)."""
    sequences = []
    for comp in output.outputs:
        tokens = list(comp.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(tokens, comp.logprobs or ())]
        if len(logprobs) != len(tokens):  # every token the engine drew has its log-prob
            raise RuntimeError(f"vLLM returned {len(tokens)} tokens but {len(logprobs)} log-probs")
        sequences.append(Sample(tokens, logprobs, stop_reason(comp.finish_reason)))
    prompt_logprobs = None
    if spec.prompt_logprobs:
        steps = output.prompt_logprobs
        prompt_logprobs = [None] + [steps[i][tok].logprob for i, tok in enumerate(prompt_ids) if i > 0]
    return Samples(sequences, prompt_logprobs)


def sample(
    engine: VLLMEngine, prompt_ids: Sequence[int], n: int, spec: SampleSettings, lora: LoRARequest | None = None
) -> Future[Samples]:
    """Start `n` samples continuing `prompt_ids` on the adapter `lora` (None: no adapter); the
    future resolves to their `Samples` when the last one finishes. On an engine that serves
    adapters the base model is `AdapterLibrary.base()`, not None (`sample_on` passes it)."""
    from vllm.inputs import TokensPrompt

    prompt = list(prompt_ids)
    request = OnAdapter(TokensPrompt(prompt_token_ids=prompt), lora)
    # Greedy (temperature 0): vLLM takes n = 1 only, and the n samples would all be the same one.
    copies = n if spec.temperature < GREEDY_BELOW else 1

    def finish(outputs: list) -> Samples:
        result = sample_result(outputs[0], prompt, spec)
        return Samples(result.sequences * copies, result.prompt_logprobs)

    return engine._submit([(request, sampling_params(n // copies, spec))], finish)


def sample_on(
    engine: VLLMEngine,
    library: AdapterLibrary,
    name: str | None,
    prompt_ids: Sequence[int],
    n: int,
    spec: SampleSettings,
) -> Future[Samples]:
    """`sample` on the library's adapter `name` (None: the base model; KeyError naming an unknown
    sampler), its folder kept until the samples finish even if it is removed meanwhile."""
    if name is None:
        return sample(engine, prompt_ids, n, spec, library.base())
    lora = library.hold(name)
    try:
        future = sample(engine, prompt_ids, n, spec, lora)
    except BaseException:
        library.release(lora)
        raise
    future.add_done_callback(lambda _: library.release(lora))
    return future


def load_adapter(engine: VLLMEngine, library: AdapterLibrary, name: str, folder: str) -> LoRARequest:
    """Add a sampler's adapter to the library and load it into the engine now (between two engine
    steps), so a bad folder fails here and the first sample does not wait for the load."""
    lora = library.add(name, folder)
    base = library.base()
    try:
        engine.at_token_boundary(lambda: [engine.engine.add_lora(x) for x in (base, lora) if x is not None]).result()
    except BaseException:
        library.remove(name)
        raise
    return lora


def drop_adapter(engine: VLLMEngine, library: AdapterLibrary, name: str) -> None:
    """Stop serving a sampler (KeyError when it is not served) and free its place in the engine's
    adapter cache; samples already running on it finish on it (vLLM reloads it if need be)."""
    lora_id = library.remove(name)
    engine.at_token_boundary(lambda: engine.engine.remove_lora(lora_id)).result()
