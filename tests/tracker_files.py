"""Reading what the experiment trackers wrote (`metrics.tensorboard`, `metrics.wandb`) with the
trackers' own formats: TensorBoard's event reader, and W&B's protobuf records from an offline run's
.wandb file. Shared by tests/unit/test_trackers.py and the job test that turns both on."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_cluster.run.run_dir import RunDir


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / RunDir.TENSORBOARD))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file, W&B's own protobufs, read from its log format
    (LevelDB's: 32 KiB blocks of chunks, each a CRC, a length, a kind (1 whole, 2-4 first, middle,
    last)), after the file's 7-byte header (":W&B", magic, version). wandb 0.31 ships no reader."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, records, chunks = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_history(records) -> list[dict]:
    rows = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def wandb_runs(run: Path) -> list[Path]:
    """The .wandb files of every W&B run (or resumption) under a run directory, oldest first."""
    return sorted((run / RunDir.WANDB).glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
