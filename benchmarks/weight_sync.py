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

Targets: direct <= 1.5x broadcast, collective <= 1.2x broadcast, filesystem <= 2x files. Also printed:
seconds per GB of each side and the bytes one sync moves per engine for fp32, bf16 and int8 engines.
The actors (the sender, the bare engines, the learner groups) are in `benchmarks._weight_sync_actors`.

    .venv/bin/python -m benchmarks.weight_sync [--size 100m|500m --dtype float32|bfloat16 --reps 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ray
import torch

from benchmarks._jobs import in_local_ray
from benchmarks._timing import median, rotated
from benchmarks._weight_sync_actors import BareEngine, Sender, learner_group
from benchmarks.common import add_rounds, headline, machine_info, parse_rounds, print_table, qwen2_shape, write_result
from rlhf_cluster.models.tiny_model import ensure_tiny_model

SIDES = ("direct", "broadcast", "collective", "filesystem", "files", "snapshot", "files_fsync", "sparse")
LEARNER_SIDES = ("rank0", "shares")  # with --learner-ranks > 1
DIRECT_TARGET, FILESYSTEM_TARGET, COLLECTIVE_TARGET, SHARES_TARGET = 1.5, 2.0, 1.2, 0.7
SIZES = {  # ~params: width, layers (head_dim 64, 4 KV heads, MLP 4x)
    "100m": (768, 12),
    "500m": (1280, 20),
}
COLLECTIVE_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="100m", help="model size (100m: 768 x 12; 500m: 1280 x 20)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="engine dtype (what travels)")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="direct transport bucket size")
    p.add_argument(
        "--delta-fraction",
        type=float,
        default=0.032,
        help="sparse side: share of each tensor's elements a version changes",
    )
    p.add_argument(
        "--learner-ranks",
        type=int,
        default=1,
        help="> 1 adds the `rank0` and `shares` sides: FSDP2 learner groups of that many ranks",
    )
    p.add_argument("--sides", nargs="*", default=None, help="the sides to time (default: all)")
    p.add_argument("--dir", default=None, help="filesystem to measure (default: a temp dir under $TMPDIR)")
    add_rounds(p, "weight_sync", reps=4, warmup=1)
    return parse_rounds(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_local_ray("bench-weight-sync-", lambda work: _run(args, work), args.dir)


def _run(args: argparse.Namespace, work: Path) -> int:
    bench = Sides(args, work)
    timings = bench.time_sides()
    proven = all(r.loaded and r.proven for r in bench.receipts)
    med = {s: {k: median(t[k] for t in ts) for k in ts[0] if k not in ("rep", "position")} for s, ts in timings.items()}
    ratios = side_ratios(med, bench.nbytes)
    print_report(args, bench, med, ratios, proven)
    write_result(
        args.out,
        {
            "benchmark": "weight_sync",
            "machine": machine_info(),
            "config": {
                **{k: v for k, v in vars(args).items() if k != "out"},
                "tiny_model": bench.tiny.model_dump(),
                "params": bench.params,
                "bytes_per_engine": bench.nbytes,
                "buckets": len(bench.specs),
                "model_build_seconds": bench.build_s,
                "actors_start_seconds": bench.start_s,
            },
            "bytes_per_sync_by_engine": bench.sizes,
            "timings": timings,
            "medians": med,
            **ratios,
            "direct_deliveries_proven": proven,
            "headline": _headline(ratios),
        },
    )
    if not proven:
        print("ERROR: a direct delivery was not proven by its fingerprint", file=sys.stderr)
        return 1
    return 0


class Sides:
    """The benchmark's model and actors, and one method per side, each moving one new version into
    both engines of its kind and returning the parts of its time (`time_sides` times them all)."""

    def __init__(self, args: argparse.Namespace, work: Path):
        from rlhf_cluster.config import JobConfig

        self.args, self.work = args, work
        self.tiny = qwen2_shape(*SIZES[args.size])
        t0 = time.perf_counter()
        self.model_dir = str(ensure_tiny_model(self.tiny, work / "models"))
        self.build_s = time.perf_counter() - t0
        self.store_dir = work / "store"
        cfg = JobConfig.model_validate(
            {
                "name": "bench",
                "run_dir": str(work / "run"),
                "model": {"path": self.model_dir, "dtype": args.dtype},
                "generation": {"max_model_len": 256, "probe": {"sequences": 0}},
                "weights": {
                    "transport": {"type": "direct", "bucket_mb": args.bucket_mb},
                    "dir": str(self.store_dir),
                    "keep": 2,
                },
            }
        )
        self.names = [
            s
            for s in (*SIDES, *LEARNER_SIDES)
            if (args.sides is None or s in args.sides) and (s not in LEARNER_SIDES or args.learner_ranks > 1)
        ]
        t0 = time.perf_counter()
        self._start_actors(cfg)
        self.start_s = time.perf_counter() - t0
        self.specs = ray.get(self.sender.bucket_specs.remote(args.bucket_mb))
        self.nbytes = sum(s.nbytes for s in self.specs)
        self.sizes = ray.get(self.sender.engine_bytes.remote())
        self.params = _param_count(self.model_dir)
        self.version = 0
        self.receipts: list = []

    def _start_actors(self, cfg) -> None:
        """The sender, two workers per transport kind (object store, broadcast group), two bare engines,
        the learner groups of the learner sides; every engine up, the broadcast group joined."""
        from actors.workers.generation import GenerationWorker
        from actors.workers.settings import GenerationSettings
        from rlhf_cluster.config import CollectiveTransport

        args, model_dir = self.args, self.model_dir
        # `.remote`: @ray.remote made these classes ActorClasses, which mypy (ignoring class decorators) cannot see.
        self.sender = Sender.remote(model_dir, args.dtype)  # type: ignore[attr-defined]
        worker = GenerationWorker.remote  # type: ignore[attr-defined]
        self.workers = [worker(GenerationSettings.of(cfg), model_dir, i) for i in range(2)]
        # The collective side's engines: workers whose transport is the broadcast group's.
        collective = CollectiveTransport(bucket_mb=args.bucket_mb, backend="gloo", timeout_s=COLLECTIVE_TIMEOUT_S)
        group_cfg = cfg.model_copy(update={"weights": cfg.weights.model_copy(update={"transport": collective})})
        settings = GenerationSettings.of(group_cfg)
        self.group_workers = [worker(settings, model_dir, 2 + i) for i in range(2)]
        bare = BareEngine.remote  # type: ignore[attr-defined]
        self.bare = [bare(model_dir, cfg.model_dump(), args.dtype, i) for i in range(2)]
        self.learners = {s: learner_group(cfg, model_dir, self.work, args, s) for s in LEARNER_SIDES if s in self.names}
        ray.get([w.info.remote() for w in self.workers + self.group_workers])  # engines up first
        addr, port = ray.get(self.sender.address.remote())
        joins = [b.join.remote(addr, port, i + 1, 3) for i, b in enumerate(self.bare)]
        ray.get([self.sender.join.remote(addr, port, 3), *joins])

    def time_sides(self) -> dict[str, list[dict]]:
        """Every side once per repetition, in an order rotated each repetition; per side, one row per
        timed repetition: its seconds (what a side leaves untimed taken off), s/GB and its parts."""
        run = {
            "direct": self.direct,
            "broadcast": self.broadcast,
            "collective": self.collective,
            "filesystem": lambda: self.filesystem(False),
            "files": lambda: self.files(False),
            "snapshot": lambda: self.filesystem(True),
            "files_fsync": lambda: self.files(True),
            "sparse": self.sparse,
            "rank0": lambda: self.learner_push("rank0"),
            "shares": lambda: self.learner_push("shares"),
        }
        timings: dict[str, list[dict]] = {s: [] for s in self.names}
        for rep in range(-self.args.warmup, self.args.reps):
            order = rotated(self.names, rep)
            for side in order:
                t = time.perf_counter()
                parts = run[side]()
                seconds = time.perf_counter() - t - parts.pop("untimed", 0.0)
                if rep >= 0:
                    timings[side].append(
                        {
                            "rep": rep,
                            "position": order.index(side),
                            "seconds": seconds,
                            "s_per_gb": seconds / (self.nbytes / 1e9),
                            **parts,
                        }
                    )
        return timings

    # ---- the sides ---------------------------------------------------------------------------
    def push(self, pack) -> tuple[list, float, float]:
        """A version packed by the sender (`pack`, a remote call) into both workers; the receipts,
        the packing's seconds and the fetch + load's."""
        t = time.perf_counter()
        delivery = ray.get(pack)
        t_pack = time.perf_counter()
        got = ray.get([w.load.remote(delivery) for w in self.workers])
        self.receipts.extend(got)
        return got, t_pack - t, time.perf_counter() - t_pack

    def direct(self) -> dict:
        self.version += 1
        got, pack_put, loaded = self.push(self.sender.pack.remote(self.version, self.args.bucket_mb))
        return {"pack_put": pack_put, "fetch_verify_load": loaded, "in_engine": max(r.seconds for r in got)}

    def learner_push(self, side: str) -> dict:
        """One version published by a learner group (its rank 0 alone, or every rank its share)
        and loaded by both workers."""
        from rlhf_cluster.weights.buckets import now
        from rlhf_cluster.weights.shares import merge_publications

        self.version += 1
        version, group, created = self.version, self.learners[side], now()
        t = time.perf_counter()
        ray.get(group.submit("publish", version, False, created))
        if side == "rank0":
            delivery = ray.get(group.leader.wait_published.remote(version)).delivery
        else:
            delivery = merge_publications(ray.get(group.submit("wait_published", version))).delivery
        t_pub = time.perf_counter()
        got = ray.get([w.load.remote(delivery) for w in self.workers])
        self.receipts.extend(got)
        return {
            "gather_pack_put": t_pub - t,
            "fetch_verify_load": time.perf_counter() - t_pub,
            "in_engine": max(r.seconds for r in got),
        }

    def sparse(self) -> dict:
        self.version += 1
        t = time.perf_counter()
        ray.get(self.sender.step_sparse.remote(self.args.delta_fraction, self.version))  # the step itself, not the sync
        untimed = time.perf_counter() - t
        got, pack_put, loaded = self.push(self.sender.pack_sparse.remote(self.version, self.args.bucket_mb))
        return {
            "pack_put": pack_put,
            "fetch_rebuild_load": loaded,
            "bytes_moved_per_engine": got[0].bytes,
            "untimed": untimed,
        }

    def collective(self) -> dict:
        from rlhf_cluster.weights.messages import Seat

        self.version += 1
        t = time.perf_counter()
        delivery = ray.get(self.sender.pack_collective.remote(self.version, self.args.bucket_mb, COLLECTIVE_TIMEOUT_S))
        t_pack = time.perf_counter()
        loads = [w.load.remote(delivery.seated(Seat(1, r, 3))) for r, w in enumerate(self.group_workers, 1)]
        send = ray.get(self.sender.send_collective.remote(delivery.seated(Seat(1, 0, 3))))
        got = ray.get(loads)
        self.receipts.extend(got)
        return {"pack": t_pack - t, "send": send, "rest": time.perf_counter() - t_pack - send}

    def broadcast(self) -> dict:
        t = time.perf_counter()
        loads = [b.receive_broadcast.remote(self.specs) for b in self.bare]
        send = ray.get(self.sender.broadcast.remote())
        ray.get(loads)
        return {"send": send, "rest": time.perf_counter() - t - send}

    def filesystem(self, durable: bool) -> dict:
        self.version += 1
        t = time.perf_counter()
        ray.get(self.sender.publish.remote(str(self.store_dir), self.version, durable))
        t_pub = time.perf_counter()
        ray.get([w.sync.remote(self.version) for w in self.workers])
        return {"publish": t_pub - t, "load_verify_reload": time.perf_counter() - t_pub}

    def files(self, fsync: bool) -> dict:
        path = str(self.work / "raw.safetensors")
        t = time.perf_counter()
        ray.get(self.sender.save_raw.remote(path, fsync))
        t_save = time.perf_counter()
        ray.get([b.load_raw.remote(path) for b in self.bare])
        t_load = time.perf_counter()
        Path(path).unlink()
        return {"save": t_save - t, "load_reload": t_load - t_save}


# ---- the figures ---------------------------------------------------------------------------------
def side_ratios(med: dict[str, dict], nbytes: int) -> dict[str, float | None]:
    """Each of ours over its bare side (seconds; sparse also bytes), as the result file names them."""

    def ratio(a: str, b: str) -> float | None:
        return med[a]["seconds"] / med[b]["seconds"] if a in med and b in med else None

    collective_ratio = ratio("collective", "broadcast")
    # The push alone (what the bare side does: its bytes were packed before the clock started);
    # the packing is the learner's, once per version, right after its step.
    collective_push_ratio = (
        (med["collective"]["send"] + med["collective"]["rest"]) / med["broadcast"]["seconds"]
        if collective_ratio is not None
        else None
    )
    return {
        "ratio_direct_over_broadcast": ratio("direct", "broadcast"),
        "ratio_collective_over_broadcast": collective_ratio,
        "ratio_collective_push_over_broadcast": collective_push_ratio,
        "ratio_filesystem_over_files": ratio("filesystem", "files"),
        "ratio_snapshot_over_files_fsync": ratio("snapshot", "files_fsync"),
        "ratio_sparse_over_direct_seconds": ratio("sparse", "direct"),
        "ratio_sparse_over_direct_bytes": med["sparse"]["bytes_moved_per_engine"] / nbytes if "sparse" in med else None,
        "ratio_shares_over_rank0": ratio("shares", "rank0"),
    }


def _headline(ratios: dict[str, float | None]) -> dict:
    shares, direct = ratios["ratio_shares_over_rank0"], ratios["ratio_direct_over_broadcast"]
    if shares is not None:
        return headline("shares/rank0 seconds", shares, f"<= {SHARES_TARGET}x", shares <= SHARES_TARGET, "x")
    return headline(
        "direct/broadcast seconds", direct, f"<= {DIRECT_TARGET}x", direct is not None and direct <= DIRECT_TARGET, "x"
    )


def print_report(args: argparse.Namespace, bench: Sides, med: dict, ratios: dict, proven: bool) -> None:
    hidden, layers = SIZES[args.size]
    print(
        f"\nweight_sync  Qwen2 {args.size}: hidden={hidden} layers={layers} ({bench.params / 1e6:.0f}M params) | "
        f"engine dtype {args.dtype}: {bench.nbytes / 1e9:.3f} GB per engine per sync | 2 engines | bucket "
        f"{args.bucket_mb} MB ({len(bench.specs)} buckets) | {args.reps} reps (+{args.warmup} warmup), medians"
    )
    labels = {
        "direct": ("direct (ours)", "broadcast"),
        "rank0": (f"rank0 (ours, {args.learner_ranks} FSDP2 ranks, rank 0 sends)", None),
        "shares": (f"shares (ours, {args.learner_ranks} FSDP2 ranks, each sends its share)", "rank0"),
        "collective": ("collective (ours, gloo group)", "broadcast"),
        "broadcast": ("broadcast (gloo + bare load)", None),
        "filesystem": ("filesystem (ours)", "files"),
        "files": ("files (save + load_file + bare load)", None),
        "snapshot": ("snapshot (ours, fsynced)", "files_fsync"),
        "files_fsync": ("files_fsync (save + fsync + load)", None),
        "sparse": ("sparse (ours, deltas)", "direct"),
    }
    print_table(
        ["side", "seconds", "s/GB", "vs", "ratio"],
        [
            [
                label,
                med[side]["seconds"],
                med[side]["s_per_gb"],
                base or "-",
                med[side]["seconds"] / med[base]["seconds"] if base and base in med else None,
            ]
            for side, (label, base) in labels.items()
            if side in med
        ],
        ["{}", "{:.3f}", "{:.3f}", "{}", "{:.2f}"],
    )
    print(
        "breakdown (medians, seconds): "
        + "; ".join(
            f"{s}: " + ", ".join(f"{k} {v:.3f}" for k, v in med[s].items() if k not in ("seconds", "s_per_gb"))
            for s in med
        )
    )
    print("bytes per sync per engine: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in bench.sizes.items()))
    r = ratios
    print(
        f"ratios: direct/broadcast {r['ratio_direct_over_broadcast']} (target <= {DIRECT_TARGET}); collective "
        f"push/broadcast {r['ratio_collective_push_over_broadcast']} (target <= {COLLECTIVE_TARGET}); "
        f"filesystem/files {r['ratio_filesystem_over_files']} (target <= {FILESYSTEM_TARGET}); snapshot/files_fsync "
        f"{r['ratio_snapshot_over_files_fsync']}; sparse/direct {r['ratio_sparse_over_direct_seconds']} (bytes "
        f"{r['ratio_sparse_over_direct_bytes']}); shares/rank0 {r['ratio_shares_over_rank0']} (target <= "
        f"{SHARES_TARGET}); every delivery proven by fingerprint: {proven}"
    )


def _param_count(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as fh:
        return sum(torch.Size(fh.get_slice(name).get_shape()).numel() for name in fh.keys())


if __name__ == "__main__":
    sys.exit(main())
