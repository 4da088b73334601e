"""The vLLM engine behind a generation worker: rollouts with per-token log-probs, weight reloads.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): it starts in seconds, and a
weight load hands the checked tensors to vLLM's weight-transfer API directly
(`generation/weight_transfer.py`). `VLLMEngine` drives vLLM's
engine loop itself (add requests, step, collect finished ones) on one thread, which is what lets
it take requests while others decode and load weights between two steps. Log-probs are taken in
`processed_logprobs` mode, i.e. after the repetition penalty, temperature, min_p, top_k and
top_p (`generation.sampling`), so they are the probabilities the tokens were actually sampled
with; the learner divides its logits by the same temperature and applies none of the others
(importance correction sees their effect as mismatch).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future

import torch

from rlhf_cluster.config import GenerationConfig, LoraConfig, SamplingConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.generation.adapter_library import OnAdapter
from rlhf_cluster.generation.batch_recorder import EngineBatchRecorder
from rlhf_cluster.generation.engine_loop import EngineLoop
from rlhf_cluster.generation.engine_outputs import GenerationStats, Turn, WeightSwap, finish_reason, response_text
from rlhf_cluster.generation.gc_pause import imports_without_gc
from rlhf_cluster.generation.int8_reload import keep_int8_scales_alive
from rlhf_cluster.generation.lora_adapters import AdapterSlot
from rlhf_cluster.generation.multimodal import (
    EngineImages,
    drop_image_embeddings,
    engine_mm_args,
    engine_request,
    image_token_id,
    serves_images,
    turn_request,
)
from rlhf_cluster.generation.routing_capture import engine_routing
from rlhf_cluster.generation.vllm_process import RotaryReloadFilter, configure_vllm_environment, engine_settings
from rlhf_cluster.models.int8_kernels import EngineDType, int8_engine_dtype
from rlhf_cluster.models.quantization import check_push, checkpoint_spec
from rlhf_cluster.models.vision import is_vision_name

log = logging.getLogger(__name__)


def policy_sampling(s: SamplingConfig, greedy: bool) -> dict:
    """vLLM's `SamplingParams` settings for `s`, the same for a group's responses and an episode's
    turns. Greedy: temperature 0, where vLLM drops top_k, top_p and min_p (they never change an
    argmax) but keeps the repetition penalty, which does."""
    return {
        "temperature": 0.0 if greedy else s.temperature,
        "top_p": s.top_p,
        "top_k": max(s.top_k, 0),  # vLLM's off is 0 (its -1 is accepted too)
        "min_p": s.min_p,
        "repetition_penalty": s.repetition_penalty,
        "ignore_eos": s.ignore_eos,
    }


class VLLMEngine(EngineLoop):
    """A vLLM engine serving rollouts, driven by its own loop thread (continuous batching).

    Callers on any thread submit requests (`submit_group`, `generate`, `logprobs_of_many`) and get
    futures; the loop thread adds them to vLLM between engine steps and resolves each future as
    soon as its requests finish, so requests that arrive one at a time share engine steps with
    those already decoding. A weight load (`load_weights`) also runs on the loop thread between
    two steps, i.e. at a token boundary, while requests are in flight: with
    `in_flight_update: resume` the unfinished requests are preempted (vLLM recomputes their KV
    with the new weights) and carry on; with `abort` they start again. vLLM records which weight
    version sampled each token (`set_weight_version`), which becomes the rollout's
    `policy_versions` spans.

    With `generation.quantization: int8`, `model_path` is an int8 start checkpoint
    (`quantization.write_int8_model_dir`) and every push must be the store's int8 variant.

    With `images` (a vision-language model), a prompt's images (`Prompt.images`) go to the
    engine beside its tokens, at most `images.max_per_prompt` of them (`multimodal`).

    With `routed_experts` (a mixture-of-experts model; `algorithm.routing_replay: rollout`), every
    rollout of `submit_group` and `generate` carries the experts the engine routed its tokens to
    (`Rollout.routed_experts`; `routing_capture`). Turns and scoring carry none.
    """

    def __init__(
        self,
        model_path: str,
        cfg: GenerationConfig,
        dtype: EngineDType = "float32",
        seed: int = 0,
        name: str = "gen0",
        on_step: Callable[[int, int], None] | None = None,
        adapters: LoraConfig | None = None,
        routed_experts: bool = False,
        images: EngineImages | None = None,
    ):
        configure_vllm_environment(cfg)
        self.routing = engine_routing(model_path, cfg) if routed_experts else None
        # vLLM's engine itself, not the `LLM` wrapper: the wrapper adds nothing this loop uses and
        # warms up a chat renderer at start (~2 s per engine on CPU).
        with imports_without_gc():  # ~2.4 s of a ~7 s engine start on CPU (see gc_pause.py)
            from vllm.config import WeightTransferConfig
            from vllm.engine.arg_utils import EngineArgs
            from vllm.usage.usage_lib import UsageContext
            from vllm.v1.engine.llm_engine import LLMEngine

            from rlhf_cluster.generation import weight_transfer
        weight_transfer.register()

        self.cfg = cfg
        self.name = name
        self.model_path = model_path
        self.version = 0
        # What a push must look like: the tensors of the checkpoint the engine was built from, or
        # with `adapters` (LoRA, `learner.lora.sync: adapters`) the adapters on them.
        self.spec = checkpoint_spec(model_path)
        self.adapters = AdapterSlot(adapters, self.spec, name) if adapters is not None else None
        self.quantized = any(kind == torch.int8 for kind, _ in self.spec.values())
        # The activations the engine runs: an int8 engine's kernels may need bf16 (AMX CPUs).
        self.dtype = int8_engine_dtype(self.spec, dtype) if self.quantized else dtype
        if self.dtype != dtype:
            log.info("%s: int8 engine on %s activations (vLLM's AMX int8 kernel takes no %s)", name, self.dtype, dtype)
        args = EngineArgs(
            **engine_settings(model_path, cfg, self.dtype, seed),
            # Weights load through vLLM's weight-transfer API, as the checked tensors our transports fetched.
            weight_transfer_config=WeightTransferConfig(backend=weight_transfer.BACKEND),
            **(self.adapters.engine_args() if self.adapters is not None else {}),
            **(self.routing.engine_args() if self.routing is not None else {}),
            **(engine_mm_args(images) if images is not None else {}),
            **cfg.engine_kwargs,
        )
        self.engine = LLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        if self.routing is not None:
            self.routing.attach(self.engine, name)
        self.batches = self._join_batch_recorder(on_step)
        self.engine.set_weight_version(str(self.version))
        self.tokenizer = self.engine.get_tokenizer()
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(RotaryReloadFilter())
        hf_config = self.engine.model_config.hf_config  # a vision-language config (transformers 5) ties at the top
        tied = bool(getattr(hf_config.get_text_config(), "tie_word_embeddings", hf_config.tie_word_embeddings))
        self.optional_tensors = frozenset({"lm_head.weight"} if tied else ())
        # A vision-language policy's frozen vision tower is never sent (`learner.freeze_vision`).
        self.omittable_tensors = frozenset(n for n in self.spec if is_vision_name(n)) if images else frozenset()
        if self.quantized:
            kernels = sum(self.engine.collective_rpc(keep_int8_scales_alive))
            if kernels == 0 and not torch.cuda.is_available():
                raise RuntimeError(f"{name}: {model_path} holds int8 weights but vLLM built no CPU int8 kernel")
        self._version_started_at_tokens = 0  # self.batches.generated_tokens when self.version was loaded
        self._start_loop()

    def _join_batch_recorder(self, on_step: Callable[[int, int], None] | None) -> EngineBatchRecorder:
        """A batch recorder among vLLM's own stat loggers (the Prometheus one feeds `get_metrics`)."""
        recorder = EngineBatchRecorder(on_step)
        if self.engine.logger_manager is None:  # vLLM builds it whenever log stats are on, as they are here
            raise RuntimeError(f"{self.name}: vLLM built no stat logger manager: the batch recorder cannot join it")
        # vLLM only calls its loggers' methods; the recorder has them without subclassing vLLM's ABC.
        self.engine.logger_manager.stat_loggers.append(recorder)  # type: ignore[arg-type]  # duck-typed logger
        return recorder

    def _lora_request(self):
        # With adapters, every request runs on the adapter slot (reloaded in place by each version).
        return self.adapters.request if self.adapters is not None else None

    def _add_request(self, batch, index: int, prompt, params) -> None:
        if not isinstance(prompt, OnAdapter):
            return super()._add_request(batch, index, prompt, params)
        # A Tinker sampler's request runs on its own adapter (`generation.sampling`), not on the slot.
        request_id = f"{self.name}-{next(self._ids)}"
        self.engine.add_request(request_id, prompt.prompt, params, lora_request=prompt.lora)
        self._requests[request_id] = (batch, index)

    def close(self) -> None:
        super().close()
        if self.adapters is not None:
            self.adapters.close()
        # vLLM's own shutdown, now rather than whenever the engine is collected: it tears down the
        # process's vLLM parallel groups, under any in-process engine built after this one.
        self.engine.engine_core.shutdown()

    # ---- requests ------------------------------------------------------------------------
    def _sampling_params(self, n: int, greedy: bool, max_tokens: int | None, sampling: SamplingConfig | None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = sampling or self.cfg.sampling
        # One engine request per response: each finishes (and can be aborted) on its own.
        # No stop strings, so nothing needs text while a response grows: the engine skips its
        # per-token detokenizing (a quarter of its time on a tiny model) and `_rollouts`
        # decodes each finished response once.
        params = SamplingParams(
            detokenize=False,
            n=1,
            **policy_sampling(s, greedy),
            max_tokens=max_tokens or s.max_new_tokens,
            logprobs=0,
            seed=None,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        return [params] * (1 if greedy else n)

    def submit_group(
        self,
        prompt: Prompt,
        n: int | None = None,
        greedy: bool = False,
        max_tokens: int | None = None,
        sampling: SamplingConfig | None = None,
    ) -> Future:
        """Start the `n` responses of one prompt group now; the future resolves to its `Rollout`s
        when the last response finishes (one greedy response with `greedy`); `sampling`: in place of
        `generation.sampling` (held-out evaluation's, `data.eval_sampling`)."""
        group_id = f"{prompt.prompt_id}:{uuid.uuid4().hex[:12]}"
        params = self._sampling_params(n or self.cfg.sampling.n, greedy, max_tokens, sampling)
        # A chat-templated prompt goes in as the template's token ids: nothing is re-tokenised; its
        # images beside them (a vision-language model's engine expands each placeholder).
        request = engine_request(prompt)
        finish = lambda outs: self._rollouts(prompt, group_id, outs)  # noqa: E731
        return self._submit([(request, p) for p in params], finish, routed=self.routing is not None)

    def _rollouts(self, prompt: Prompt, group_id: str, outputs: list) -> list[Rollout]:
        rollouts = []
        sample_ids = [f"{group_id}:{k}" for k in range(len(outputs))]
        routed = self.routing.group(outputs, sample_ids) if self.routing is not None else [None] * len(outputs)
        for k, out in enumerate(outputs):
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            spans = [(span.start, int(span.version)) for span in comp.weight_versions or () if span.end > span.start]
            if not spans:  # no token sampled: the response belongs to the version it was asked of
                spans = [(0, int(self.engine.get_weight_version()))]
            rollouts.append(
                Rollout(
                    sample_id=sample_ids[k],
                    prompt_id=prompt.prompt_id,
                    group_id=group_id,
                    prompt_ids=list(out.prompt_token_ids),
                    response_ids=ids,
                    rollout_logprobs=[step[tok].logprob for tok, step in zip(ids, comp.logprobs)],
                    policy_version=spans[0][1],
                    policy_versions=spans,
                    finish_reason=finish_reason(comp.finish_reason),
                    response_text=response_text(self.tokenizer, ids),
                    worker=self.name,
                    routed_experts=routed[k],
                    images=prompt.images,
                )
            )
        return rollouts

    def submit_turn(
        self,
        context_ids: list[int],
        max_tokens: int,
        stop: list[str],
        greedy: bool = False,
        images: Sequence[bytes] = (),
    ) -> Future:
        """One model turn of an episode: a single response continuing `context_ids` (the prompt
        and the episode so far), ending at EOS, a `stop` string (kept) or `max_tokens`; `images`:
        every image of the context so far, in order (a vision-language model; `turn_request`).
        The future resolves to a `Turn`."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = self.cfg.sampling
        params = SamplingParams(
            n=1,
            **policy_sampling(s, greedy),
            max_tokens=max_tokens,
            logprobs=0,
            seed=None,
            stop=list(stop) or None,
            include_stop_str_in_output=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

        def finish(outputs: list) -> Turn:
            comp = outputs[0].outputs[0]
            ids = list(comp.token_ids)
            spans = [(span.start, int(span.version)) for span in comp.weight_versions or () if span.end > span.start]
            return Turn(
                ids,
                [step[tok].logprob for tok, step in zip(ids, comp.logprobs)],
                spans or [(0, int(self.engine.get_weight_version()))],
                finish_reason(comp.finish_reason),
                comp.text,
                list(outputs[0].prompt_token_ids),
            )

        request = turn_request(context_ids, images, image_token_id(self.engine))
        return self._submit([(request, params)], finish)

    def generate(
        self, prompts: list[Prompt], n: int | None = None, greedy: bool = False
    ) -> tuple[list[Rollout], GenerationStats]:
        """`n` responses per prompt (one greedy response for evaluation), all submitted at once;
        returns when the slowest has finished."""
        start = time.perf_counter()
        futures = [self.submit_group(p, n, greedy) for p in prompts]
        rollouts = [r for f in futures for r in f.result()]
        tokens = sum(len(r.response_ids) for r in rollouts)
        return rollouts, GenerationStats(len(prompts), len(rollouts), tokens, time.perf_counter() - start)

    def speculative_stats(self) -> dict[str, int]:
        """vLLM's speculative-decoding counters so far: drafts, draft tokens, accepted tokens (all 0 when off)."""
        names = {
            "vllm:spec_decode_num_drafts": "drafts",
            "vllm:spec_decode_num_draft_tokens": "draft_tokens",
            "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
        }
        from vllm.v1.metrics.reader import Counter

        out = dict.fromkeys(names.values(), 0)
        for metric in self.engine.get_metrics():
            if isinstance(metric, Counter) and metric.name in names:
                out[names[metric.name]] = int(metric.value)
        return out

    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The engine's log-probs of a fixed response (prompt log-probs of the joined sequence)."""
        return self.logprobs_of_many([prompt_ids], [response_ids])[0]

    def logprobs_of_many(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """`logprobs_of` for several sequences in one engine call (temperature 1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
        )
        sequences = [p + r for p, r in zip(prompts, responses)]

        def finish(outputs: list) -> list[list[float]]:
            return [
                [out.prompt_logprobs[i][seq[i]].logprob for i in range(len(p), len(seq))]
                for p, seq, out in zip(prompts, sequences, outputs)
            ]

        return self._submit([(TokensPrompt(prompt_token_ids=seq), params) for seq in sequences], finish).result()

    # ---- weights -------------------------------------------------------------------------
    def load_weights(self, version: int, weights: Iterable[tuple[str, torch.Tensor]]) -> WeightSwap:
        """Reload weights in place (same engine) at the next token boundary, with requests in flight.

        The push is checked against the engine's tensor layout first (`WeightSpecError` if it
        does not fit). Afterwards no cached KV from the old weights is used again: the prefix
        cache is dropped (prompts longer than one KV block would otherwise reuse old attention
        state) and so is the KV of every unfinished request, which vLLM recomputes from its
        tokens so far with the new weights (`resume`) or which starts again (`abort`).
        """
        weights = list(weights)
        if self.adapters is not None:
            load = self.adapters.write(version, weights)  # checked against the slot's layout first
            # Requests that started on the base model (before the first adapters) restart on the slot.
            restart = self.adapters.request is None
            swap = lambda: self._swap(version, lambda: self._load_adapters(load), restart)  # noqa: E731
            return self.at_token_boundary(swap).result()
        check_push(self.spec, weights, self.name, self.optional_tensors, self.omittable_tensors)
        return self.at_token_boundary(lambda: self._swap(version, lambda: self._load_tensors(weights))).result()

    def _load_tensors(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.engine.collective_rpc("start_weight_update")
        self.engine.collective_rpc("update_weights", kwargs={"update_info": {"weights": weights}})
        self.engine.collective_rpc("finish_weight_update")

    def _load_adapters(self, load) -> None:
        assert self.adapters is not None  # only an engine with an adapter slot loads adapters
        self.engine.add_lora(load)
        self.adapters.loaded(load)

    def _swap(self, version: int, load: Callable[[], None], restart: bool = False) -> WeightSwap:
        start = time.perf_counter()
        unfinished = list(self._requests)
        aborted = []
        if unfinished and (restart or self.cfg.in_flight_update == "abort"):
            self.engine.abort_request(unfinished)
            aborted = [self._requests.pop(rid) for rid in unfinished]
            for rid in unfinished:
                self._request_dropped(rid)
        load()
        if serves_images(self.engine):  # its cached image embeddings are the old vision tower's
            drop_image_embeddings(self.engine)
        self.engine.set_weight_version(str(version))
        # With requests running, resetting the cache preempts them: their KV is recomputed.
        self.engine.reset_prefix_cache(reset_running_requests=bool(self._requests))
        for batch, index in aborted:
            self._add_request(batch, index, *batch.inputs[index])
        # Weights change only between steps, so every step's tokens belong to one version.
        generated = self.batches.generated_tokens
        swap = WeightSwap(
            version,
            time.perf_counter() - start,
            len(unfinished) - len(aborted),
            len(aborted),
            generated - self._version_started_at_tokens,
        )
        self.version, self._version_started_at_tokens = version, generated
        return swap
