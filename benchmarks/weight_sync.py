"""Weight sync: every transport, learner side to two live vLLM engines, against the bare wire and disk.

A random Qwen2 (`--size 100m` or `500m`, built in a temp dir with the tiny tokenizer) is held by a
`Sender` actor standing where the learner's rank 0 stands, and served by two real
`GenerationWorker` actors (vLLM engines) per transport kind (object store, broadcast group) plus
two bare engine actors. Per repetition, with the
order rotated every repetition, each side moves one new version into both engines:

- `direct` (ours): the sender's `VersionPacker` (cast to the engine dtype, layer-aligned buckets
  in reused staging memory, BLAKE3 per bucket, `ray.put`), then `GenerationWorker.load` on both workers at once (fetch
  from the object store, verify every bucket, in-place reload, fingerprint, prefix-cache reset).
- `broadcast` (bare wire): the same bucket bytes, already packed, sent by `torch.distributed`
  gloo broadcast from the sender to both bare engines, which load them with the bare
  `VLLMEngine.load_weights` (no checksum, no manifest, no fingerprint).
- `collective` (ours, `weights.transport: collective` over gloo): the sender's transport packs
  the version (as `direct` does, the buckets kept on the sender), then sends it (a header and one
  broadcast per bucket, in a group of the sender and two `GenerationWorker`s seated by the push)
  while both workers `load` it (take part in the broadcasts, verify every bucket, in-place
  reload, fingerprint). Against `broadcast`: the same bytes over the same kind of group.
- `filesystem` (ours): `WeightStore.publish` on the sender as the filesystem transport writes a
  version between snapshots (engine-dtype safetensors, BLAKE3 beside the write, manifest, atomic
  rename, LATEST; no fsync of the shards), then `GenerationWorker.sync` on both workers
  (manifest, lease, verified load, in-place reload).
- `files` (bare disk): `safetensors.save_file` of the same engine-dtype tensors, then on both
  bare engines `load_file` + the bare engine load.
- `snapshot` (ours) and `files_fsync` (bare): the same two with the shards fsynced, as every
  `persist_every`-th version and every checkpoint's is written: what durability costs.
- `sparse` (ours, `delta: sparse`): the sender's `direct` transport with sparse deltas publishes
  a version in which `--delta-fraction` of each tensor's elements changed since the previous one
  (a synthetic step, made untimed before; 0.032 is what a learner step changed in bf16 at lr
  1e-6, `weight_changes.py`), then `GenerationWorker.load` on both workers (fetch the newest
  delta, rebuild on the engine's copy, prove the full tensors, in-place reload). Compared with
  `direct`, which moves the whole version.

- `rank0` and `shares` (ours, `--learner-ranks N` > 1): two real FSDP2 learner groups of N
  `LearnerRank` actors (gloo), one with `weights.transport.senders: rank0`, one with `every_rank`,
  each publishing one version (`LearnerRank.publish`: every parameter gathered to the rank that
  sends it, in a thread ahead of the packing; cast, packed in reused staging memory, checksummed,
  put) that `GenerationWorker.load` on both workers then fetches, checks, proves and loads (for
  `shares` the ranks' parts merged into one delivery first). Issue 55: shares <= 0.7x rank0.

Targets: direct <= 1.5x broadcast, collective <= 1.2x broadcast, filesystem <= 2x files. Also printed: seconds per GB of each
side and the bytes one sync moves per engine for fp32, bf16 and int8 engines.

    .venv/bin/python benchmarks/weight_sync.py [--size 100m|500m --dtype float32|bfloat16 --reps 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from _common import (
    headline, in_local_ray, machine_info, median, print_table, qwen2_shape, result_path, rotated, write_result,
)
from rlhf_cluster.models.tiny_model import ensure_tiny_model

SIDES = ("direct", "broadcast", "collective", "filesystem", "files", "snapshot", "files_fsync", "sparse")
LEARNER_SIDES = ("rank0", "shares")  # with --learner-ranks > 1
DIRECT_TARGET, FILESYSTEM_TARGET, COLLECTIVE_TARGET, SHARES_TARGET = 1.5, 2.0, 1.2, 0.7
SIZES = {  # ~params: width, layers (head_dim 64, 4 KV heads, MLP 4x)
    "100m": (768, 12),
    "500m": (1280, 20),
}
DEFAULT_OUT = result_path("weight_sync")
COLLECTIVE_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="100m", help="model size (100m: 768 x 12; 500m: 1280 x 20)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="engine dtype (what travels)")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="direct transport bucket size")
    p.add_argument("--reps", type=int, default=4, help="timed repetitions per side (after --warmup)")
    p.add_argument("--delta-fraction", type=float, default=0.032,
                   help="sparse side: share of each tensor's elements a version changes")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per side first")
    p.add_argument("--learner-ranks", type=int, default=1,
                   help="> 1 adds the `rank0` and `shares` sides: FSDP2 learner groups of that many ranks")
    p.add_argument("--sides", nargs="*", default=None, help="the sides to time (default: all)")
    p.add_argument("--dir", default=None, help="filesystem to measure (default: a temp dir under $TMPDIR)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


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
        return Delivery("direct", version, created, {"full": VariantLink(manifest.fingerprint, manifest, tuple(buckets))})

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
            self.sparse = build_transport(cfg, WeightStore(tempfile.mkdtemp(prefix="bench-sparse-")), ["full"], self.dtype,
                                          put=ray.put)
        return self.sparse.publish(version, now(), iter(self.sparse_state.items()), {}, snapshot=False).result().delivery

    def bucket_specs(self, bucket_mb: float) -> list:
        """Pack once, untimed: the broadcast side sends exactly these bytes."""
        from rlhf_cluster.weights.buckets import engine_tensors, pack_buckets

        packed = list(pack_buckets(engine_tensors(self.state.items(), "full", self.dtype), int(bucket_mb * (1 << 20))))
        self.payloads = [torch.from_numpy(p) for _, p in packed]
        return [s for s, _ in packed]

    def broadcast(self) -> float:
        start = time.perf_counter()
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
        for kind, variant, dtype in (("fp32", "full", torch.float32), ("bf16", "full", torch.bfloat16),
                                     ("int8", "int8", torch.bfloat16)):
            out[kind] = sum(t.numel() * t.element_size() for _, t in engine_tensors(self.state.items(), variant, dtype))
        return out


@ray.remote
class BareEngine:
    """A vLLM engine with nothing of ours around its load: the bare side of both comparisons."""

    def __init__(self, model_dir: str, cfg_dict: dict, dtype: str, index: int):
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


def _learner_group(cfg, model_dir: str, work: Path, args: argparse.Namespace, side: str):
    """A real FSDP2 learner group of `--learner-ranks` ranks whose transport is `direct` with
    `senders` by `side`; no version of the benchmark is a snapshot (nothing goes to disk)."""
    from actors.workers.learner import LearnerRank
    from actors.workers.rank_group import RankGroup
    from actors.workers.settings import LearnerRankSettings
    from rlhf_cluster.config import DirectTransport, ResourcesConfig

    never = 1_000_000
    transport = DirectTransport(bucket_mb=args.bucket_mb, senders="rank0" if side == "rank0" else "every_rank")
    group_cfg = cfg.model_copy(update={
        "learner": cfg.learner.model_copy(update={"world_size": args.learner_ranks}),
        "weights": cfg.weights.model_copy(update={"transport": transport, "persist_every": never,
                                                  "dir": str(work / f"store-{side}")}),
        "train": cfg.train.model_copy(update={"total_steps": never}),
        "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": never}),
    })
    settings = LearnerRankSettings.of(group_cfg)
    return RankGroup(LearnerRank, lambda r: (settings, model_dir, r, args.learner_ranks), ResourcesConfig(),
                     args.learner_ranks)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_local_ray("bench-weight-sync-", lambda work: _run(args, work), args.dir)


def _run(args: argparse.Namespace, work: Path) -> int:
    from actors.workers.generation import GenerationWorker
    from actors.workers.settings import GenerationSettings
    from rlhf_cluster.config import CollectiveTransport, JobConfig
    from rlhf_cluster.weights.buckets import now
    from rlhf_cluster.weights.messages import Seat
    from rlhf_cluster.weights.shares import merge_publications

    hidden, layers = SIZES[args.size]
    tiny = qwen2_shape(hidden, layers)
    t0 = time.perf_counter()
    model_dir = str(ensure_tiny_model(tiny, work / "models"))
    build_s = time.perf_counter() - t0
    store_dir = work / "store"
    cfg = JobConfig.model_validate({
        "name": "bench", "run_dir": str(work / "run"), "model": {"path": model_dir, "dtype": args.dtype},
        "generation": {"max_model_len": 256, "probe": {"sequences": 0}},
        "weights": {"transport": {"type": "direct", "bucket_mb": args.bucket_mb}, "dir": str(store_dir), "keep": 2},
    })
    t0 = time.perf_counter()
    sender = Sender.remote(model_dir, args.dtype)
    workers = [GenerationWorker.remote(GenerationSettings.of(cfg), model_dir, i) for i in range(2)]
    # The collective side's engines: workers whose transport is the broadcast group's.
    group_cfg = cfg.model_copy(update={"weights": cfg.weights.model_copy(update={"transport": CollectiveTransport(
        bucket_mb=args.bucket_mb, backend="gloo", timeout_s=COLLECTIVE_TIMEOUT_S)})})
    group_workers = [GenerationWorker.remote(GenerationSettings.of(group_cfg), model_dir, 2 + i) for i in range(2)]
    bare = [BareEngine.remote(model_dir, cfg.model_dump(), args.dtype, i) for i in range(2)]
    sides = [s for s in (*SIDES, *LEARNER_SIDES) if (args.sides is None or s in args.sides)
             and (s not in LEARNER_SIDES or args.learner_ranks > 1)]
    learners = {s: _learner_group(cfg, model_dir, work, args, s) for s in LEARNER_SIDES if s in sides}
    ray.get([w.info.remote() for w in workers + group_workers])  # engines up first
    addr, port = ray.get(sender.address.remote())
    ray.get([sender.join.remote(addr, port, 3)] + [b.join.remote(addr, port, i + 1, 3) for i, b in enumerate(bare)])
    start_s = time.perf_counter() - t0
    specs = ray.get(sender.bucket_specs.remote(args.bucket_mb))
    nbytes = sum(s.nbytes for s in specs)
    sizes = ray.get(sender.engine_bytes.remote())
    params = _param_count(model_dir)
    version = 0
    receipts: list = []

    def push(pack) -> tuple[list, float, float]:
        """A version packed by the sender (`pack`, a remote call) into both workers; the receipts,
        the packing's seconds and the fetch + load's."""
        t = time.perf_counter()
        delivery = ray.get(pack)
        t_pack = time.perf_counter()
        got = ray.get([w.load.remote(delivery) for w in workers])
        receipts.extend(got)
        return got, t_pack - t, time.perf_counter() - t_pack

    def direct() -> dict:
        nonlocal version
        version += 1
        got, pack_put, loaded = push(sender.pack.remote(version, args.bucket_mb))
        return {"pack_put": pack_put, "fetch_verify_load": loaded, "in_engine": max(r.seconds for r in got)}

    def learner_push(side: str) -> dict:
        """One version published by a learner group (its rank 0 alone, or every rank its share)
        and loaded by both workers."""
        nonlocal version
        version += 1
        group, created = learners[side], now()
        t = time.perf_counter()
        ray.get(group.submit("publish", version, False, created))
        if side == "rank0":
            delivery = ray.get(group.leader.wait_published.remote(version)).delivery
        else:
            delivery = merge_publications(ray.get(group.submit("wait_published", version))).delivery
        t_pub = time.perf_counter()
        got = ray.get([w.load.remote(delivery) for w in workers])
        receipts.extend(got)
        return {"gather_pack_put": t_pub - t, "fetch_verify_load": time.perf_counter() - t_pub,
                "in_engine": max(r.seconds for r in got)}

    def sparse() -> dict:
        nonlocal version
        version += 1
        t = time.perf_counter()
        ray.get(sender.step_sparse.remote(args.delta_fraction, version))  # the step itself, not the sync
        untimed = time.perf_counter() - t
        got, pack_put, loaded = push(sender.pack_sparse.remote(version, args.bucket_mb))
        return {"pack_put": pack_put, "fetch_rebuild_load": loaded, "bytes_moved_per_engine": got[0].bytes,
                "untimed": untimed}

    def collective() -> dict:
        nonlocal version
        version += 1
        t = time.perf_counter()
        delivery = ray.get(sender.pack_collective.remote(version, args.bucket_mb, COLLECTIVE_TIMEOUT_S))
        t_pack = time.perf_counter()
        seat = lambda rank: delivery.seated(Seat(1, rank, 3))  # noqa: E731
        got = [w.load.remote(seat(r)) for r, w in enumerate(group_workers, 1)]
        send = ray.get(sender.send_collective.remote(seat(0)))
        got = ray.get(got)
        receipts.extend(got)
        return {"pack": t_pack - t, "send": send, "rest": time.perf_counter() - t_pack - send}

    def broadcast() -> dict:
        t = time.perf_counter()
        loads = [b.receive_broadcast.remote(specs) for b in bare]
        send = ray.get(sender.broadcast.remote())
        ray.get(loads)
        return {"send": send, "rest": time.perf_counter() - t - send}

    def filesystem(durable: bool) -> dict:
        nonlocal version
        version += 1
        t = time.perf_counter()
        ray.get(sender.publish.remote(str(store_dir), version, durable))
        t_pub = time.perf_counter()
        ray.get([w.sync.remote(version) for w in workers])
        return {"publish": t_pub - t, "load_verify_reload": time.perf_counter() - t_pub}

    def files(fsync: bool) -> dict:
        path = str(work / "raw.safetensors")
        t = time.perf_counter()
        ray.get(sender.save_raw.remote(path, fsync))
        t_save = time.perf_counter()
        ray.get([b.load_raw.remote(path) for b in bare])
        t_load = time.perf_counter()
        Path(path).unlink()
        return {"save": t_save - t, "load_reload": t_load - t_save}

    run = {"direct": direct, "broadcast": broadcast, "collective": collective, "filesystem": lambda: filesystem(False), "files": lambda: files(False),
           "snapshot": lambda: filesystem(True), "files_fsync": lambda: files(True), "sparse": sparse,
           "rank0": lambda: learner_push("rank0"), "shares": lambda: learner_push("shares")}
    timings: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(-args.warmup, args.reps):
        order = rotated(sides, rep)
        for side in order:
            t = time.perf_counter()
            parts = run[side]()
            seconds = time.perf_counter() - t - parts.pop("untimed", 0.0)
            if rep >= 0:
                timings[side].append({"rep": rep, "position": order.index(side), "seconds": seconds,
                                      "s_per_gb": seconds / (nbytes / 1e9), **parts})
    proven = all(r.loaded and r.proven for r in receipts)

    med = {s: {k: median(t[k] for t in ts) for k in ts[0] if k not in ("rep", "position")} for s, ts in timings.items()}

    def ratio(a: str, b: str) -> float | None:
        return med[a]["seconds"] / med[b]["seconds"] if a in med and b in med else None

    direct_ratio, collective_ratio = ratio("direct", "broadcast"), ratio("collective", "broadcast")
    # The push alone (what the bare side does: its bytes were packed before the clock started);
    # the packing is the learner's, once per version, right after its step.
    collective_push_ratio = (
        (med["collective"]["send"] + med["collective"]["rest"]) / med["broadcast"]["seconds"]
        if collective_ratio is not None else None
    )
    fs_ratio, snapshot_ratio = ratio("filesystem", "files"), ratio("snapshot", "files_fsync")
    sparse_ratio, shares_ratio = ratio("sparse", "direct"), ratio("shares", "rank0")
    sparse_bytes = med["sparse"]["bytes_moved_per_engine"] / nbytes if "sparse" in med else None
    print(f"\nweight_sync  Qwen2 {args.size}: hidden={hidden} layers={layers} ({params / 1e6:.0f}M params) | engine dtype "
          f"{args.dtype}: {nbytes / 1e9:.3f} GB per engine per sync | 2 engines | bucket {args.bucket_mb} MB "
          f"({len(specs)} buckets) | {args.reps} reps (+{args.warmup} warmup), medians")
    labels = {"direct": ("direct (ours)", "broadcast"),
              "rank0": (f"rank0 (ours, {args.learner_ranks} FSDP2 ranks, rank 0 sends)", None),
              "shares": (f"shares (ours, {args.learner_ranks} FSDP2 ranks, each sends its share)", "rank0"),
              "collective": ("collective (ours, gloo group)", "broadcast"), "broadcast": ("broadcast (gloo + bare load)", None),
              "filesystem": ("filesystem (ours)", "files"), "files": ("files (save + load_file + bare load)", None),
              "snapshot": ("snapshot (ours, fsynced)", "files_fsync"),
              "files_fsync": ("files_fsync (save + fsync + load)", None), "sparse": ("sparse (ours, deltas)", "direct")}
    print_table(
        ["side", "seconds", "s/GB", "vs", "ratio"],
        [[label, med[side]["seconds"], med[side]["s_per_gb"], base or "-", ratio(side, base) if base else None]
         for side, (label, base) in labels.items() if side in med],
        ["{}", "{:.3f}", "{:.3f}", "{}", "{:.2f}"],
    )
    print("breakdown (medians, seconds): " + "; ".join(
        f"{s}: " + ", ".join(f"{k} {v:.3f}" for k, v in med[s].items() if k not in ("seconds", "s_per_gb")) for s in med))
    print("bytes per sync per engine: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    print(f"ratios: direct/broadcast {direct_ratio} (target <= {DIRECT_TARGET}); collective push/broadcast "
          f"{collective_push_ratio} (target <= {COLLECTIVE_TARGET}); filesystem/files {fs_ratio} (target <= "
          f"{FILESYSTEM_TARGET}); snapshot/files_fsync {snapshot_ratio}; sparse/direct {sparse_ratio} (bytes "
          f"{sparse_bytes}); shares/rank0 {shares_ratio} (target <= {SHARES_TARGET}); every delivery proven by "
          f"fingerprint: {proven}")

    write_result(args.out, {
        "benchmark": "weight_sync",
        "machine": machine_info(),
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "tiny_model": tiny.model_dump(), "params": params,
                   "bytes_per_engine": nbytes, "buckets": len(specs), "model_build_seconds": build_s,
                   "actors_start_seconds": start_s},
        "bytes_per_sync_by_engine": sizes,
        "timings": timings,
        "medians": med,
        "ratio_direct_over_broadcast": direct_ratio,
        "ratio_collective_over_broadcast": collective_ratio,
        "ratio_collective_push_over_broadcast": collective_push_ratio,
        "ratio_filesystem_over_files": fs_ratio,
        "ratio_snapshot_over_files_fsync": snapshot_ratio,
        "ratio_sparse_over_direct_seconds": sparse_ratio,
        "ratio_sparse_over_direct_bytes": sparse_bytes,
        "ratio_shares_over_rank0": shares_ratio,
        "direct_deliveries_proven": proven,
        "headline": (
            headline("shares/rank0 seconds", shares_ratio, f"<= {SHARES_TARGET}x", shares_ratio <= SHARES_TARGET, "x")
            if shares_ratio is not None else
            headline("direct/broadcast seconds", direct_ratio, f"<= {DIRECT_TARGET}x",
                     direct_ratio is not None and direct_ratio <= DIRECT_TARGET, "x")
        ),
    })
    if not proven:
        print("ERROR: a direct delivery was not proven by its fingerprint", file=sys.stderr)
        return 1
    return 0


def _param_count(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as fh:
        return sum(torch.Size(fh.get_slice(name).get_shape()).numel() for name in fh.keys())


if __name__ == "__main__":
    sys.exit(main())
