"""A sample's routed experts (`RoutedExperts`, routing replay) as a column of the sample schema,
and the check that a routing fits the sample it travels with.

The column is a nullable struct (null: a dense model, or an engine that returned no routing):
the compact record's fields as they are, its bytes as one binary value (64-bit offsets: a
buffer of long mixture-of-experts samples holds gigabytes of routing, over the 2 GiB a plain
binary column's offsets reach).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from rlhf_cluster.models.routed_experts import RoutedExperts

ROUTED_EXPERTS_TYPE = pa.struct(
    [
        pa.field("start", pa.int32(), nullable=False),
        pa.field("layers", pa.int16(), nullable=False),
        pa.field("top_k", pa.int16(), nullable=False),
        pa.field("wide", pa.bool_(), nullable=False),
        pa.field("data", pa.large_binary(), nullable=False),
    ]
)


def check_routed_experts(sample_id: str, routed: RoutedExperts | None, sequence_length: int) -> None:
    """Refuse a routing that does not fit its sample of `sequence_length` prompt+response tokens:
    whole [tokens, layers, top_k] rows, for positions from `start` on that the engine ran (every
    one but the sequence's last: its token is sampled, never run)."""
    if routed is None:
        return
    if not isinstance(routed, RoutedExperts):
        raise TypeError(f"sample {sample_id}: routed_experts must be a RoutedExperts or None, got {type(routed)}")
    dtype = "uint16" if routed.wide else "uint8"
    if routed.layers < 1 or routed.top_k < 1 or len(routed.data) % (routed.layers * routed.top_k * (1 + routed.wide)):
        raise ValueError(
            f"sample {sample_id}: routed experts of {len(routed.data)} bytes are not whole rows of "
            f"[tokens, {routed.layers}, {routed.top_k}] {dtype}"
        )
    ran = sequence_length - 1  # positions 0 .. ran - 1
    if routed.start < 0 or routed.start + routed.tokens > ran:
        raise ValueError(
            f"sample {sample_id}: routed experts for {routed.tokens} tokens from position {routed.start} do not fit "
            f"its {sequence_length}-token sequence (the engine runs positions 0..{ran - 1}, not the last): expected "
            f"at most [{max(ran - routed.start, 0)}, {routed.layers}, {routed.top_k}] {dtype} from position "
            f"{routed.start} (start >= 0)"
        )


def routing_to_row(routed: RoutedExperts | None) -> dict[str, Any] | None:
    """One value of the `routed_experts` column."""
    if routed is None:
        return None
    return {
        "start": routed.start,
        "layers": routed.layers,
        "top_k": routed.top_k,
        "wide": routed.wide,
        "data": routed.data,
    }


def routing_from_row(row: dict[str, Any] | None) -> RoutedExperts | None:
    """Inverse of `routing_to_row`."""
    if row is None:
        return None
    return RoutedExperts(
        int(row["start"]), int(row["layers"]), int(row["top_k"]), bool(row["wide"]), bytes(row["data"])
    )
