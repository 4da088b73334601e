"""How vLLM is set up in a generation worker's process, apart from the engine that runs in it:
the environment vLLM reads at import, whether the engine runs eager, and the log noise of
in-place reloads. Ray-free."""

from __future__ import annotations

import logging
import os

import torch

from rlhf_cluster.config import GenerationConfig


def configure_vllm_environment(cfg: GenerationConfig) -> None:
    """Environment vLLM reads at import/engine start; call before importing vllm."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
    # Several engines share a 2-core machine with other actors: pinning each to "its" cores
    # would stack them all on the same ones.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if runs_eager(cfg):
        # Eager means no compilation at all: vLLM still torch.compiles a few helpers (the
        # log-prob rank count), and inductor's first C++ build costs ~2 s per engine on CPU.
        # Process-wide, like the settings above: a generation worker's process runs only its engine.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


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
