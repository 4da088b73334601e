"""The vLLM engine behind a generation worker: rollouts with per-token log-probs, weight reloads.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): it starts in seconds and lets
`collective_rpc("reload_weights", ...)` receive tensors directly. Log-probs are taken in
`processed_logprobs` mode, i.e. after temperature, so they are the probabilities the tokens
were actually sampled with; the learner divides its logits by the same temperature.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Iterable

import torch

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.quantization import check_push, checkpoint_spec, keep_int8_scales_alive
from rlhf_cluster.records import Rollout


def configure_vllm_environment(cfg: GenerationConfig) -> None:
    """Environment vLLM reads at import/engine start; call before importing vllm."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
    # Several engines share a 2-core machine with other actors: pinning each to "its" cores
    # would stack them all on the same ones.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class _RotaryReloadFilter(logging.Filter):
    """Drop vLLM's "RotaryEmbedding: Failed to load weights" on every reload.

    The rotary cos/sin cache is derived, not a checkpoint tensor, so an in-place reload never
    carries it and vLLM keeps the existing one, which is what we want. The warning is noise;
    the reload test checks log-probs after reload against the published weights.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


@dataclass
class GenerationStats:
    """What one `generate` call did, for metrics."""

    prompts: int
    responses: int
    tokens: int
    seconds: float


class VLLMEngine:
    """A vLLM `LLM` serving rollouts for one policy version at a time.

    With `generation.quantization: int8`, `model_path` is an int8 start checkpoint
    (`quantization.write_int8_model_dir`) and every push must be the store's int8 variant.
    """

    def __init__(self, model_path: str, cfg: GenerationConfig, dtype: str = "float32", seed: int = 0, name: str = "gen0"):
        configure_vllm_environment(cfg)
        from vllm import LLM

        self.cfg = cfg
        self.name = name
        self.model_path = model_path
        self.version = 0
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )
        self.tokenizer = self.llm.get_tokenizer()
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadFilter())
        # What a push must look like: the tensors of the checkpoint the engine was built from.
        self.spec = checkpoint_spec(model_path)
        tied = bool(self.llm.llm_engine.model_config.hf_config.get_text_config().tie_word_embeddings)
        self.optional_tensors = frozenset({"lm_head.weight"} if tied else ())
        self.quantized = any(dtype == torch.int8 for dtype, _ in self.spec.values())
        if self.quantized:
            kernels = sum(self.llm.collective_rpc(keep_int8_scales_alive))
            if kernels == 0 and not torch.cuda.is_available():
                raise RuntimeError(f"{name}: {model_path} holds int8 weights but vLLM built no CPU int8 kernel")

    def generate(
        self, prompts: list[Prompt], n: int | None = None, greedy: bool = False
    ) -> tuple[list[Rollout], GenerationStats]:
        """`n` responses per prompt (one greedy response for evaluation); each is a `Rollout`
        tagged with the engine's version."""
        from vllm import SamplingParams

        s = self.cfg.sampling
        params = SamplingParams(
            n=1 if greedy else (n or s.n),
            temperature=0.0 if greedy else s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_new_tokens,
            logprobs=0,
            seed=None,
        )
        start = time.perf_counter()
        outputs = self.llm.generate([p.text for p in prompts], params, use_tqdm=False)
        rollouts: list[Rollout] = []
        tokens = 0
        for prompt, out in zip(prompts, outputs):
            group_id = f"{prompt.prompt_id}:{uuid.uuid4().hex[:12]}"
            for k, comp in enumerate(out.outputs):
                ids = list(comp.token_ids)
                logprobs = [step[tok].logprob for tok, step in zip(ids, comp.logprobs)]
                tokens += len(ids)
                rollouts.append(
                    Rollout(
                        sample_id=f"{group_id}:{k}",
                        prompt_id=prompt.prompt_id,
                        group_id=group_id,
                        prompt_ids=list(out.prompt_token_ids),
                        response_ids=ids,
                        rollout_logprobs=logprobs,
                        policy_version=self.version,
                        finish_reason=_finish_reason(comp.finish_reason),
                        response_text=comp.text,
                        worker=self.name,
                    )
                )
        stats = GenerationStats(len(prompts), len(rollouts), tokens, time.perf_counter() - start)
        return rollouts, stats

    def logprobs_of(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The engine's log-probs of a fixed response (prompt log-probs of the joined sequence)."""
        return self.logprobs_of_many([prompt_ids], [response_ids])[0]

    def logprobs_of_many(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """`logprobs_of` for several sequences in one engine call (temperature 1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompts, responses)], params, use_tqdm=False
        )
        result = []
        for p, r, out in zip(prompts, responses, outputs):
            seq = p + r
            result.append([out.prompt_logprobs[i][seq[i]].logprob for i in range(len(p), len(seq))])
        return result

    def load_weights(self, version: int, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload weights in place (same engine), then drop the prefix cache.

        The push is checked against the engine's tensor layout first (`WeightSpecError` if it
        does not fit). Without the cache reset, prompts longer than one KV block would reuse
        attention state computed with the old weights.
        """
        weights = list(weights)
        check_push(self.spec, weights, self.name, self.optional_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.version = version


def _finish_reason(reason: str | None) -> str:
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop"
    return "abort"
