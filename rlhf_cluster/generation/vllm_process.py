"""How vLLM is set up in a generation worker's process, apart from the engine that runs in it:
the environment vLLM reads at import, whether the engine runs eager, the engine arguments the
project sets itself (`engine_settings`), and the log noise of in-place reloads. Ray-free."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.models.int8_kernels import EngineDType

log = logging.getLogger(__name__)
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
# Whether the engines of this process run eager: torch.compile is switched off for the whole
# process (TORCHDYNAMO_DISABLE), so every engine in it must agree (None: no engine yet).
_process_eager: bool | None = None


def configure_vllm_environment(cfg: GenerationConfig) -> None:
    """Environment vLLM reads at import/engine start; call before importing vllm.

    Only what is the same for every engine of a process is set here. What differs per engine is
    an engine argument (the CPU KV cache's size: `cpu_kv_cache_bytes`), so two engines of one
    process with different settings each get their own; a second engine whose eager mode differs
    from the first's is refused, since that one is process-wide."""
    global _process_eager
    eager = runs_eager(cfg)
    if _process_eager is not None and eager != _process_eager:
        raise RuntimeError(
            f"generation.enforce_eager: this process already runs an engine with enforce_eager="
            f"{_process_eager}, and torch.compile is on or off for the whole process; start an engine "
            f"with enforce_eager={eager} in another process (another generation worker)"
        )
    _process_eager = eager
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM applies this variable over every engine's own KV size: the config's field sizes each engine.
    ignored = os.environ.pop(KV_CACHE_ENV, "")
    if ignored:
        log.warning(
            "%s=%s in the environment is ignored: generation.kv_cache_gb sizes each engine's KV cache",
            KV_CACHE_ENV,
            ignored,
        )
    # Several engines share a 2-core machine with other actors: pinning each to "its" cores
    # would stack them all on the same ones.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if eager:
        # Eager means no compilation at all: vLLM still torch.compiles a few helpers (the
        # log-prob rank count), and inductor's first C++ build costs ~2 s per engine on CPU.
        # Process-wide: every engine of the process must agree (checked above).
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def cpu_kv_cache_bytes(cfg: GenerationConfig) -> int | None:
    """vLLM's kv_cache_memory_bytes for this engine: `kv_cache_gb` on CPU; None (sized by
    gpu_memory_utilization) where CUDA is present."""
    return None if torch.cuda.is_available() else cfg.kv_cache_gb * (1 << 30)


def runs_eager(cfg: GenerationConfig) -> bool:
    """vLLM's enforce_eager for this engine: the config's, else eager exactly when no CUDA."""
    return cfg.enforce_eager if cfg.enforce_eager is not None else not torch.cuda.is_available()


class RotaryReloadFilter(logging.Filter):
    """Drop vLLM's "RotaryEmbedding: Failed to load weights" on every reload.

    The rotary cos/sin cache is derived, not a checkpoint tensor, so an in-place reload never
    carries it and vLLM keeps the existing one, which is what we want. The warning is noise;
    the reload test checks log-probs after reload against the published weights.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


def engine_settings(model_path: str, cfg: GenerationConfig, dtype: EngineDType, seed: int) -> dict[str, Any]:
    """The vLLM engine arguments the project sets itself, from the generation config's own fields,
    for an engine of `model_path` running `dtype` activations (the weight transfer, the adapters
    and the user's `engine_kwargs` are added to them)."""
    return dict(
        model=model_path,
        dtype=dtype,
        seed=seed,
        # CUDA graphs where CUDA is present (vLLM captures them once per engine), eager on CPU.
        enforce_eager=runs_eager(cfg),
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        kv_cache_memory_bytes=cpu_kv_cache_bytes(cfg),
        logprobs_mode="processed_logprobs",
        enable_prefix_caching=cfg.enable_prefix_caching,
        speculative_config=cfg.speculative.engine_config() if cfg.speculative else None,
        disable_log_stats=False,  # scheduler stats feed EngineBatchRecorder
    )
