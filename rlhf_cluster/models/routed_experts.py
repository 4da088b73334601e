"""A sample's routed experts in their compact form: the experts the generation engine routed each
token to, per decoder layer, top-k small ints (uint8 where the model has at most 256 experts, uint16
above), as they travel with a sample through the buffer, its Arrow files and checkpoints.

The shape is vLLM's (`CompletionOutput.routed_experts`, [tokens, layers, top_k], the layer axis
counting decoder layers; from the sequence position `routed_experts_prompt_start` on). No torch
here: the buffer and the scoring pools read samples without it; `routing_replay` lays these out
for the learner's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RoutedExperts:
    """The experts the engine routed one sample's tokens to: sequence positions `start`,
    `start + 1`, ... (prompt and response tokens; the sequence's last token is never run by the
    engine), `layers` decoder layers, `top_k` choices each, as row-major bytes of uint8 (`wide`:
    uint16, for models of more than 256 experts)."""

    start: int
    layers: int
    top_k: int
    wide: bool
    data: bytes

    @property
    def tokens(self) -> int:
        return len(self.data) // (self.layers * self.top_k * (2 if self.wide else 1))


def compact_routing(experts: Any, num_experts: int, start: int = 0, sample_id: str = "?") -> RoutedExperts:
    """`experts` [tokens, layers, top_k] (ints: a numpy array as an engine returns it, a CPU tensor,
    nested lists) in the compact form."""
    array = np.asarray(experts)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"sample {sample_id}: routed experts must be integers of shape [tokens, layers, top_k], "
            f"got {array.dtype} of shape {list(array.shape)}"
        )
    if start < 0:
        raise ValueError(f"sample {sample_id}: routed experts start at position {start}, must be >= 0")
    if array.size and (array.min() < 0 or array.max() >= num_experts):
        raise ValueError(
            f"sample {sample_id}: routed expert {int(array.max() if array.max() >= num_experts else array.min())} "
            f"out of range: the model has {num_experts} experts (0..{num_experts - 1})"
        )
    wide = num_experts > 256
    data = array.astype("<u2" if wide else np.uint8).tobytes()
    return RoutedExperts(start, int(array.shape[1]), int(array.shape[2]), wide, data)


def expand_routing(
    routed: RoutedExperts,
    sample_id: str,
    sequence_length: int,
    layers: int,
    top_k: int,
    num_experts: int,
) -> np.ndarray:
    """`routed` as int64 [tokens, layers, top_k], checked against the sample (`sequence_length`
    prompt+response tokens) and the model (`layers` decoder layers, `top_k` of `num_experts`);
    every refusal names the sample and the shape expected."""
    itemsize = 2 if routed.wide else 1
    row = routed.layers * routed.top_k * itemsize
    if routed.layers != layers or routed.top_k != top_k or row == 0 or len(routed.data) % row:
        raise ValueError(
            f"sample {sample_id}: routed experts of {routed.layers} layers x top-{routed.top_k} "
            f"({len(routed.data)} bytes); the model expects [tokens, {layers}, {top_k}]"
        )
    array = np.frombuffer(routed.data, dtype="<u2" if routed.wide else np.uint8).reshape(-1, layers, top_k)
    if routed.start < 0 or routed.start + len(array) > sequence_length:
        raise ValueError(
            f"sample {sample_id}: routed experts for positions {routed.start}..{routed.start + len(array) - 1} "
            f"of a {sequence_length}-token sequence; expected at most [{sequence_length - routed.start}, "
            f"{layers}, {top_k}] from position {routed.start}"
        )
    if array.size and int(array.max()) >= num_experts:
        raise ValueError(
            f"sample {sample_id}: routed expert {int(array.max())} out of range: "
            f"the model has {num_experts} experts (0..{num_experts - 1})"
        )
    return array.astype(np.int64)
