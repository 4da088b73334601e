"""LoRA weight sync: the adapters alone (`learner.lora.sync: adapters`) against the merged model
(`merged`), each into a live vLLM engine, and the two engines' outputs compared.

A random Qwen2 (`--size 100m`: hidden 768, 12 layers, 104M parameters; or `30m`: hidden 512, 6 layers) is built in a
temp dir with the tiny tokenizer. A `Sender` actor holds the base weights and random LoRA
adapters of `--rank` on every projection (A random, B random at `--b-scale`: a policy that has
moved), and per repetition, order rotated, packs one new version through the object store
transport (cast, buckets, BLAKE3, `ray.put`):

- `adapters` (ours): the adapter matrices alone, received by a `GenerationWorker` whose engine
  serves them as a vLLM LoRA adapter (written as a peft folder, reloaded in place).
- `merged` (the path for engines that cannot take adapters): W + alpha/r B A under the base
  names, received by a plain `GenerationWorker` (vLLM's layerwise reload).

Reported: bytes per sync (adapters / merged; target <= 0.05), seconds (pack + receive), and
after the last version the largest difference between the two engines' log-probs of the same
sequences (the adapter engine must sample as the merged one: target < 1e-3 in fp32).

    .venv/bin/python -m benchmarks.lora_sync [--size 100m --rank 16 --reps 4]
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
from benchmarks.common import add_rounds, headline, machine_info, parse_rounds, print_table, qwen2_shape, write_result
from rlhf_cluster.models.tiny_model import ensure_tiny_model

SIDES = ("adapters", "merged")
BYTES_TARGET, LOGPROB_TARGET = 0.05, 1e-3
SIZES = {"30m": (512, 6), "100m": (768, 12)}  # width, layers (head_dim 64, 4 KV heads, MLP 4x)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="100m")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    p.add_argument("--b-scale", type=float, default=0.02, help="std of the random B matrices")
    add_rounds(p, "lora_sync", reps=4, warmup=1)
    return parse_rounds(p, argv)


@ray.remote
class Sender:
    """Where the learner's rank 0 stands: base weights and adapters; packs either form of a version."""

    def __init__(self, model_dir: str, rank: int, alpha: float, targets: list[str]):
        from safetensors.torch import load_file

        from rlhf_cluster.config import LoraConfig
        from rlhf_cluster.models.lora import PEFT_PREFIX, adapter_names

        self.base = load_file(str(Path(model_dir) / "model.safetensors"))
        self.cfg = LoraConfig(rank=rank, alpha=alpha, target_modules=targets)
        self.layers = sorted(
            {n.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for n in adapter_names(self.base, self.cfg)}
        )
        self.prefix = PEFT_PREFIX

    def new_version(self, seed: int, b_scale: float) -> None:
        """Untimed: the adapters of a policy that has moved (random A and B)."""
        g = torch.Generator().manual_seed(seed)
        self.adapters = {}
        for layer in self.layers:
            out_f, in_f = self.base[f"{layer}.weight"].shape
            self.adapters[f"{self.prefix}{layer}.lora_A.weight"] = (
                torch.randn(self.cfg.rank, in_f, generator=g) / in_f**0.5
            )
            self.adapters[f"{self.prefix}{layer}.lora_B.weight"] = (
                torch.randn(out_f, self.cfg.rank, generator=g) * b_scale
            )

    def merged(self) -> dict[str, torch.Tensor]:
        scale = self.cfg.alpha / self.cfg.rank
        out = dict(self.base)
        for layer in self.layers:
            a = self.adapters[f"{self.prefix}{layer}.lora_A.weight"]
            b = self.adapters[f"{self.prefix}{layer}.lora_B.weight"]
            out[f"{layer}.weight"] = self.base[f"{layer}.weight"] + scale * (b @ a)
        return out

    def pack(self, version: int, side: str):
        """What `LearnerRank.publish` does with `transport: direct`: one variant's delivery."""
        from rlhf_cluster.weights.buckets import VersionPacker, now
        from rlhf_cluster.weights.messages import Delivery, VariantLink

        tensors = self.adapters if side == "adapters" else self.merged()
        created = now()
        manifest, buckets = VersionPacker(version, created, "full", torch.float32, 64 << 20, ray.put).pack(
            tensors.items()
        )
        return Delivery(
            "direct", version, created, {"full": VariantLink(manifest.fingerprint, manifest, tuple(buckets))}
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return in_local_ray("bench-lora-sync-", lambda work: _run(args, work), None)


def _run(args: argparse.Namespace, work: Path) -> int:
    from actors.workers.generation import GenerationWorker
    from actors.workers.settings import GenerationSettings
    from rlhf_cluster.config import JobConfig

    hidden, layers = SIZES[args.size]
    tiny = qwen2_shape(hidden, layers)
    model_dir = str(ensure_tiny_model(tiny, work / "models"))
    lora = {"rank": args.rank, "alpha": args.alpha}
    cfgs = {
        side: JobConfig.model_validate(
            {
                "name": "bench",
                "run_dir": str(work / side),
                "model": {"path": model_dir, "dtype": "float32"},
                "generation": {"max_model_len": 256, "probe": {"sequences": 0}},
                "learner": {"lora": {**lora, "sync": side}},
                "scoring": {"reference": False},
                "algorithm": {"kl": {"coef": 0.0, "placement": "loss"}},
            }
        )
        for side in SIDES
    }
    targets = cfgs["adapters"].learner.lora.target_modules
    # `.remote`: @ray.remote made these classes ActorClasses, which mypy (ignoring class decorators) cannot see.
    sender = Sender.remote(model_dir, args.rank, args.alpha, targets)  # type: ignore[attr-defined]
    workers = {
        side: GenerationWorker.remote(GenerationSettings.of(cfgs[side]), model_dir, i)  # type: ignore[attr-defined]
        for i, side in enumerate(SIDES)
    }
    ray.get([w.info.remote() for w in workers.values()])
    timings, receipts = time_sides(args, sender, workers)
    diff = logprob_difference(workers)
    proven = all(r.loaded and r.proven for r in receipts)

    med = {side: {k: median(t[k] for t in ts) for k in ts[0]} for side, ts in timings.items()}
    bytes_ratio = med["adapters"]["bytes"] / med["merged"]["bytes"]
    seconds_ratio = med["adapters"]["seconds"] / med["merged"]["seconds"]
    print(
        f"\nlora_sync  Qwen2 {args.size} (hidden {hidden}, {layers} layers), LoRA rank {args.rank} on "
        f"{', '.join(targets)} | fp32 engines | {args.reps} reps (+{args.warmup} warmup), medians"
    )
    print_table(
        ["side", "MB per sync", "seconds", "pack + put", "receive + load"],
        [
            [side, med[side]["bytes"] / 1e6, med[side]["seconds"], med[side]["pack_put"], med[side]["receive"]]
            for side in SIDES
        ],
        ["{}", "{:.2f}", "{:.3f}", "{:.3f}", "{:.3f}"],
    )
    print(
        f"adapters/merged: bytes {bytes_ratio:.4f} (target <= {BYTES_TARGET}), seconds {seconds_ratio:.3f}; "
        f"largest log-prob difference between the two engines {diff:.2e} (target < {LOGPROB_TARGET}); "
        f"every delivery proven by fingerprint: {proven}"
    )
    write_result(
        args.out,
        {
            "benchmark": "lora_sync",
            "machine": machine_info(),
            "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "tiny_model": tiny.model_dump()},
            "timings": timings,
            "medians": med,
            "ratio_bytes": bytes_ratio,
            "ratio_seconds": seconds_ratio,
            "max_logprob_diff": diff,
            "deliveries_proven": proven,
            "headline": headline(
                "adapters/merged bytes per sync",
                bytes_ratio,
                f"<= {BYTES_TARGET}",
                bytes_ratio <= BYTES_TARGET and diff < LOGPROB_TARGET and proven,
            ),
        },
    )
    return 0 if proven and diff < LOGPROB_TARGET else 1


def time_sides(args: argparse.Namespace, sender, workers: dict) -> tuple[dict[str, list[dict]], list]:
    """Per repetition a new version, packed and received by each side (order rotated): per side one
    row per timed repetition, and every receipt."""
    timings: dict[str, list[dict]] = {side: [] for side in SIDES}
    receipts = []
    for version, rep in enumerate(range(-args.warmup, args.reps), 1):
        ray.get(sender.new_version.remote(version, args.b_scale))
        for side in rotated(SIDES, rep):
            t = time.perf_counter()
            delivery = ray.get(sender.pack.remote(version, side))
            t_pack = time.perf_counter()
            receipt = ray.get(workers[side].load.remote(delivery))
            done = time.perf_counter()
            receipts.append(receipt)
            if rep >= 0:
                timings[side].append(
                    {"seconds": done - t, "pack_put": t_pack - t, "receive": done - t_pack, "bytes": receipt.bytes}
                )
    return timings, receipts


def logprob_difference(workers: dict) -> float:
    """Both engines hold the same version, as adapters and as merged weights: the largest difference
    between their log-probs of the same random sequences."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (24,), generator=g).tolist() for _ in range(8)]
    responses = [torch.randint(3, 60, (16,), generator=g).tolist() for _ in range(8)]
    logprobs = {
        side: [ray.get(w.logprobs_of.remote(p, r)) for p, r in zip(prompts, responses)] for side, w in workers.items()
    }
    return max(abs(a - b) for x, y in zip(logprobs["adapters"], logprobs["merged"]) for a, b in zip(x, y))


if __name__ == "__main__":
    sys.exit(main())
