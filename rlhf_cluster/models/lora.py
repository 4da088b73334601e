"""LoRA for the policy (peft): adapters on, base frozen; what each version sends to generation.

Only the adapter matrices train. With `learner.lora.sync: adapters` (the default) a version is
the adapters alone, under peft's saved names (`adapter_file_name`): each engine serves them as a
vLLM LoRA adapter, reloaded in place, and a sync moves the adapters' bytes only. With `merged`
it is the merged model, W + (alpha / r) B A, under the base model's names, for engines that
cannot take adapters. The base model with the adapters disabled is the frozen reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from rlhf_cluster.config import LoraConfig
from rlhf_cluster.models.modeling import decoder_layer

PEFT_PREFIX = "base_model.model."


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """`model` wrapped by peft with adapters on `cfg.target_modules`; every base weight frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    missing = sorted(set(cfg.target_modules) - present)
    if missing:
        raise ValueError(
            f"learner.lora.target_modules: {missing} name no linear layer of this model (it has {sorted(present)})"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; it is only divided (alpha / r)
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_file_name(name: str) -> str:
    """An adapter parameter's name as peft saves it (and vLLM loads it): without the adapter's
    name (`.default`), e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return name.replace(".default.", ".")


def adapter_names(base_names: Iterable[str], cfg: LoraConfig) -> set[str]:
    """The adapter tensors (`adapter_file_name`s) peft makes for a model with these weights."""
    out = set()
    for name in base_names:
        layer, _, kind = name.rpartition(".")
        if kind == "weight" and layer.rsplit(".", 1)[-1] in cfg.target_modules and decoder_layer(name) is not None:
            out |= {f"{PEFT_PREFIX}{layer}.lora_A.weight", f"{PEFT_PREFIX}{layer}.lora_B.weight"}
    return out


def adapter_config(cfg: LoraConfig) -> dict:
    """peft's `adapter_config.json` for adapters made by `apply_lora` (what vLLM reads beside them)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.target_modules),
        "bias": "none",
    }


def merge_lora_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft LoRA model's full state dict as the plain model's: W + scale * (B @ A) per adapted
    layer, names without peft's prefixes (what the weight store and the engines expect)."""
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_adapter_param(name):
            continue
        plain = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        if name.endswith(".base_layer.weight"):
            layer = name[: -len(".base_layer.weight")]
            a = state[f"{layer}.lora_A.default.weight"].to(torch.float32)
            b = state[f"{layer}.lora_B.default.weight"].to(torch.float32)
            tensor = (tensor.to(torch.float32) + scale * (b @ a)).to(tensor.dtype)
        merged[plain] = tensor
    return merged


def merged_lora_tensors(named: Iterable[tuple[str, torch.Tensor]], scale: float) -> Iterator[tuple[str, torch.Tensor]]:
    """`merge_lora_state_dict` over a stream of tensors, one decoder layer at a time (a layer's
    base weights and adapters arrive together), so a sender gathering layer by layer never holds
    the whole model."""
    group: dict[str, torch.Tensor] = {}
    layer: str | None = None
    for name, tensor in named:
        this_layer = decoder_layer(name)
        if group and this_layer != layer:
            yield from merge_lora_state_dict(group, scale).items()
            group = {}
        group[name], layer = tensor, this_layer
    yield from merge_lora_state_dict(group, scale).items()
