"""vLLM's CPU int8 kernel made safe for in-place weight reloads (run in the engine's worker)."""

from __future__ import annotations


def keep_int8_scales_alive(worker) -> int:
    """Run in the engine's worker (``collective_rpc``): make every CPU int8 kernel hold the scale
    tensor its oneDNN handler was built from.

    The handler keeps a raw pointer to ``weight_scale``; an in-place reload replaces that
    parameter and frees the tensor, after which every output is NaN. Wrapping the build step
    so the kernel keeps a Python reference fixes it for every later reload. Returns the number
    of int8 kernels found (0 on engines without int8 layers, or on GPU kernels, which copy).
    """
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel

    if not getattr(CPUInt8ScaledMMLinearKernel, "_rlhf_keeps_scale", False):
        build = CPUInt8ScaledMMLinearKernel.process_weights_for_onednn

        def process_weights_for_onednn(self, layer):
            build(self, layer)
            self._scale_keepalive = getattr(layer, self.layer_param_names[1])

        # A deliberate patch of vLLM's class, marked so that it is applied once per process.
        CPUInt8ScaledMMLinearKernel.process_weights_for_onednn = process_weights_for_onednn  # type: ignore[method-assign]  # patch
        CPUInt8ScaledMMLinearKernel._rlhf_keeps_scale = True  # type: ignore[attr-defined]  # our marker on vLLM's class
    kernels = 0
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "scheme", None), "kernel", None)
        if isinstance(kernel, CPUInt8ScaledMMLinearKernel):
            kernels += 1
    return kernels
