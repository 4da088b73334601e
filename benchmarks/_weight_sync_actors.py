"""The actors of the weight-sync benchmark (`benchmarks.weight_sync`): the sender, standing where the
learner's rank 0 stands, the bare engines the comparisons' bare sides load into, the gloo group
between them, and the real FSDP2 learner groups of the `rank0` and `shares` sides."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from rlhf_cluster.models.int8_kernels import EngineDType


@ray.remote
class Sender:
    """Where the learner's rank 0 stands: holds the full weights and sends each version."""

    def __init__(self, model_dir: str, dtype: str):
        from safetensors.torch import load_file

        self.state = load_file(str(Path(model_dir) / "model.safetensors"))  # fp32, as the learner gathers them
        self.dtype = getattr(torch, dtype)
        self.payloads: list | None = None
        from rlhf_cluster.weights.buckets import Staging

        self.staging = Staging(reuse=True)  # as the direct transport packs: `ray.put` copies each bucket away

    def address(self):
        from actors.workers._common import rendezvous_address

        return rendezvous_address()

    def join(self, addr: str, port: int, world: int) -> None:
        self.group = _gloo_group(addr, port, 0, world)

    def pack(self, version: int, bucket_mb: float):
        """What `LearnerRank.publish` does for `direct` (one variant): a delivery of object-store buckets."""
        from rlhf_cluster.weights.buckets import VersionPacker, now
        from rlhf_cluster.weights.messages import Delivery, VariantLink

        created = now()
        packer = VersionPacker(version, created, "full", self.dtype, int(bucket_mb * (1 << 20)), ray.put, self.staging)
        manifest, buckets = packer.pack(self.state.items())
        return Delivery(
            "direct", version, created, {"full": VariantLink(manifest.fingerprint, manifest, tuple(buckets))}
        )

    def pack_collective(self, version: int, bucket_mb: float, timeout_s: float):
        """What `LearnerRank.publish` does for `collective`: buckets packed and kept here, a
        delivery of manifests and the group's address."""
        from rlhf_cluster.config import CollectiveTransport, WeightsConfig
        from rlhf_cluster.weights import WeightStore
        from rlhf_cluster.weights.buckets import now
        from rlhf_cluster.weights.registry import build_transport

        if getattr(self, "collective", None) is None:
            cfg = WeightsConfig(transport=CollectiveTransport(bucket_mb=bucket_mb, backend="gloo", timeout_s=timeout_s))
            store = WeightStore(tempfile.mkdtemp(prefix="bench-collective-"))
            self.collective = build_transport(cfg, store, ["full"], self.dtype, host=ray.util.get_node_ip_address())
        named = ((k, v.to(self.dtype)) for k, v in self.state.items())
        return self.collective.publish(version, now(), named, {}, snapshot=False).result().delivery

    def send_collective(self, delivery) -> float:
        """What `LearnerRank.send` does: rank 0's part of the push."""
        start = time.perf_counter()
        self.collective.send(delivery)
        return time.perf_counter() - start

    def step_sparse(self, fraction: float, seed: int) -> None:
        """Untimed: a synthetic learner step for the sparse side, `fraction` of each tensor's elements changed."""
        if getattr(self, "sparse_state", None) is None:
            self.sparse_state = {k: v.to(self.dtype) for k, v in self.state.items()}
        g = torch.Generator().manual_seed(seed)
        for name, t in self.sparse_state.items():
            moved = torch.rand(t.shape, generator=g) < fraction
            self.sparse_state[name] = torch.where(moved, -t - 0.5, t)

    def pack_sparse(self, version: int, bucket_mb: float):
        """What `LearnerRank.publish` does for `direct` with `delta: sparse`."""
        from rlhf_cluster.config import DirectTransport, WeightsConfig
        from rlhf_cluster.weights import WeightStore
        from rlhf_cluster.weights.buckets import now
        from rlhf_cluster.weights.registry import build_transport

        if getattr(self, "sparse", None) is None:
            cfg = WeightsConfig(transport=DirectTransport(bucket_mb=bucket_mb, delta="sparse", full_every=1_000_000))
            self.sparse = build_transport(
                cfg, WeightStore(tempfile.mkdtemp(prefix="bench-sparse-")), ["full"], self.dtype, put=ray.put
            )
        return (
            self.sparse.publish(version, now(), iter(self.sparse_state.items()), {}, snapshot=False).result().delivery
        )

    def bucket_specs(self, bucket_mb: float) -> list:
        """Pack once, untimed: the broadcast side sends exactly these bytes."""
        from rlhf_cluster.weights.buckets import engine_tensors, pack_buckets

        packed = list(pack_buckets(engine_tensors(self.state.items(), "full", self.dtype), int(bucket_mb * (1 << 20))))
        self.payloads = [torch.from_numpy(p) for _, p in packed]
        return [s for s, _ in packed]

    def broadcast(self) -> float:
        start = time.perf_counter()
        assert self.payloads is not None, "bucket_specs packs the bytes first"
        for payload in self.payloads:
            _broadcast(self.group, payload)
        return time.perf_counter() - start

    def publish(self, store_dir: str, version: int, durable: bool) -> None:
        """What `LearnerRank.publish` does for `filesystem`: the engine-dtype state into the store."""
        from rlhf_cluster.weights import WeightStore

        state = {k: v.to(self.dtype) for k, v in self.state.items()}
        WeightStore(store_dir, keep=2).publish(version, state, durable=durable)

    def save_raw(self, path: str, fsync: bool) -> None:
        from safetensors.torch import save_file

        from rlhf_cluster.fileio import fsync_path

        save_file({k: v.to(self.dtype).contiguous() for k, v in self.state.items()}, path)
        if fsync:
            fsync_path(path)

    def engine_bytes(self) -> dict[str, int]:
        """Bytes one sync moves per engine, by engine kind."""
        from rlhf_cluster.weights.buckets import engine_tensors

        out = {}
        for kind, variant, dtype in (
            ("fp32", "full", torch.float32),
            ("bf16", "full", torch.bfloat16),
            ("int8", "int8", torch.bfloat16),
        ):
            out[kind] = sum(t.numel() * t.element_size() for _, t in engine_tensors(self.state.items(), variant, dtype))
        return out


@ray.remote
class BareEngine:
    """A vLLM engine with nothing of ours around its load: the bare side of both comparisons."""

    def __init__(self, model_dir: str, cfg_dict: dict, dtype: EngineDType, index: int):
        from rlhf_cluster.config import JobConfig
        from rlhf_cluster.generation.engine import VLLMEngine

        cfg = JobConfig.model_validate(cfg_dict)
        self.engine = VLLMEngine(model_dir, cfg.generation, dtype=dtype, seed=index, name=f"bare{index}")
        self.version = 0

    def join(self, addr: str, port: int, rank: int, world: int) -> None:
        self.group = _gloo_group(addr, port, rank, world)

    def receive_broadcast(self, specs: list) -> float:
        from rlhf_cluster.weights.buckets import unpack_bucket

        start = time.perf_counter()
        tensors = []
        for spec in specs:
            buffer = torch.empty(spec.nbytes, dtype=torch.uint8)
            _broadcast(self.group, buffer)
            tensors.extend(unpack_bucket(spec, buffer.numpy()))
        self.version += 1
        self.engine.load_weights(self.version, tensors)
        return time.perf_counter() - start

    def load_raw(self, path: str) -> float:
        from safetensors.torch import load_file

        start = time.perf_counter()
        self.version += 1
        self.engine.load_weights(self.version, load_file(path).items())
        return time.perf_counter() - start


def learner_group(cfg, model_dir: str, work: Path, args: argparse.Namespace, side: str):
    """A real FSDP2 learner group of `--learner-ranks` ranks whose transport is `direct` with
    `senders` by `side`; no version of the benchmark is a snapshot (nothing goes to disk)."""
    from actors.workers.learner import LearnerRank
    from actors.workers.rank_group import RankGroup
    from actors.workers.settings import LearnerRankSettings
    from rlhf_cluster.config import DirectTransport, ResourcesConfig

    never = 1_000_000
    transport = DirectTransport(bucket_mb=args.bucket_mb, senders="rank0" if side == "rank0" else "every_rank")
    group_cfg = cfg.model_copy(
        update={
            "learner": cfg.learner.model_copy(update={"world_size": args.learner_ranks}),
            "weights": cfg.weights.model_copy(
                update={"transport": transport, "persist_every": never, "dir": str(work / f"store-{side}")}
            ),
            "train": cfg.train.model_copy(update={"total_steps": never}),
            "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": never}),
        }
    )
    settings = LearnerRankSettings.of(group_cfg)
    return RankGroup(
        LearnerRank, lambda r: (settings, model_dir, r, args.learner_ranks), ResourcesConfig(), args.learner_ranks
    )


def _gloo_group(addr: str, port: int, rank: int, world: int):
    """A gloo group of its own between the sender and the engines. The in-process vLLM engine has
    already made this process's default torch.distributed group (world size 1), so a weight
    group cannot be the default one; it is built directly on a TCPStore, as peers build theirs."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=300))
    return dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=300))


def _broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()
