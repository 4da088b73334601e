"""A mixture of experts' weights in its checkpoint layout: one tensor per expert and projection.

transformers 5 holds the experts of an MoE layer (Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek) stacked:
`mlp.experts.gate_up_proj` `[experts, 2 * intermediate, hidden]` (gate rows first, then up) and
`mlp.experts.down_proj` `[experts, hidden, intermediate]`, while the model's folder (what an engine
was built from, and what `save_pretrained` writes) names each expert's projections apart:
`mlp.experts.<e>.gate_proj.weight`, `.up_proj.weight`, `.down_proj.weight`. Versions leave the
learner in the folder's layout, so a pushed version has the names, shapes and dtypes the engine's
checkpoint has (the push is checked against them), a stored version is a checkpoint like the
model folder, INT8 variants quantise each expert's projections like any linear layer, and vLLM's
weight loader maps the per-expert tensors into its fused `w13`/`w2` stacks itself. A dense
model's tensors, and experts already held apart, pass through unchanged. Mixtral's folder names
its experts otherwise (`block_sparse_moe.experts.<e>.w1/w3/w2`): its versions are refused by the
engine's push check, naming the tensors, until a family table maps them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

_GATE_UP, _DOWN = "experts.gate_up_proj", "experts.down_proj"


def is_stacked_experts(name: str, tensor: torch.Tensor) -> bool:
    """A layer's experts stacked in one 3-D tensor, as transformers 5 holds them."""
    return tensor.ndim == 3 and name.endswith((f".{_GATE_UP}", f".{_DOWN}"))


def split_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """One stacked tensor as its per-expert checkpoint tensors, in expert order; each its own
    copy (a store writes each tensor alone; a packer may keep them) on the tensor's device."""
    prefix = name.removesuffix("gate_up_proj").removesuffix("down_proj")  # "....mlp.experts."
    if name.endswith(_GATE_UP):
        if tensor.shape[1] % 2:
            raise ValueError(f"{name}: gate and up projections of odd total width {tensor.shape[1]}")
        gate, up = tensor.chunk(2, dim=1)
        for expert in range(tensor.shape[0]):
            yield f"{prefix}{expert}.gate_proj.weight", gate[expert].clone()
            yield f"{prefix}{expert}.up_proj.weight", up[expert].clone()
    else:
        for expert in range(tensor.shape[0]):
            yield f"{prefix}{expert}.down_proj.weight", tensor[expert].clone()


def checkpoint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`named` (consumed lazily, in order) with every stacked expert tensor split per expert."""
    for name, tensor in named:
        if is_stacked_experts(name, tensor):
            yield from split_experts(name, tensor)
        else:
            yield name, tensor


def checkpoint_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`checkpoint_tensors` of a whole state dict; the same dict where nothing is stacked."""
    if not any(is_stacked_experts(name, tensor) for name, tensor in state_dict.items()):
        return state_dict
    return dict(checkpoint_tensors(state_dict.items()))
