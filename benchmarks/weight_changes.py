"""Weight changes per step: how many engine-dtype bytes a learner step changes, and what LoRA ships.

Runs a real job (`Job`, local Ray, the demo's setup: FSDP2 ranks, one vLLM worker, GRPO) for
`--steps` steps with every version kept on disk (`weights.persist_every: 1`), then compares each
version with the one before, as the engine would receive them:

- the fraction of elements (and so bytes) whose value changed, in the engine dtype (fp32 as
  published, and cast to bf16 the way a bf16 engine would get them);
- the fraction of 64 MB-style buckets (here: layers, the unit a bucket never splits) with any
  change: what a `delta` option that skips unchanged buckets could save.

It also prints the bytes one sync ships for the merged weights vs LoRA adapters only (rank
`--lora-rank` on every decoder projection, bf16), computed from the model's shapes.
It then sends every version (cast to bf16, as a bf16 engine gets it) through the real `direct`
transport twice, side by side: whole, and with `delta: sparse` (each version after the first as
the elements changed since the previous one), each fetched and rebuilt by an engine-side
transport, and reports bytes and seconds (publish + fetch) of sparse vs whole, checking that the
rebuilt weights equal the version sent (veRL reports 1-3% of bf16 elements changed per step).

    .venv/bin/python -m benchmarks.weight_changes [--steps 8 --size demo|100m]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import ray
import torch

from benchmarks.common import REPO, headline, machine_info, result_path, write_result

SIZES = {"demo": None, "100m": (768, 12)}
DEFAULT_OUT = result_path("weight_changes")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", choices=sorted(SIZES), default="demo", help="demo: the demo's tiny model; 100m: 768 x 12")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument(
        "--lr", type=float, default=None, help="learner.lr (default: the demo's 3e-4; RL at scale runs ~1e-6)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rlhf_cluster.weights import WeightStore

    work = Path(tempfile.mkdtemp(prefix="bench-weight-changes-"))
    cfg = run_job(args, work)
    store = WeightStore(cfg.weights_dir)
    versions = store.versions()
    rows = changes_per_version(store, versions)
    delta = sparse_vs_whole(store, versions)

    state = store.load(versions[-1])
    merged = sum(t.numel() * 2 for t in state.values())  # bf16
    adapters = sum(
        args.lora_rank * (t.shape[0] + t.shape[1]) * 2
        for n, t in state.items()
        if t.ndim == 2 and n.split(".")[-2] in PROJECTIONS
    )
    mean = {k: statistics.fmean(r[k] for r in rows) for k in ("fp32", "bf16", "layers")}
    params = sum(t.numel() for t in state.values())
    print(
        f"\nweight_changes  {args.size} ({params / 1e6:.1f}M params), {args.steps} steps of the demo job, "
        f"lr {cfg.learner.lr:g}"
    )
    for r in rows:
        print(
            f"version {r['version']:3d}: changed elements fp32 {r['fp32']:.4f}, bf16 {r['bf16']:.4f}; "
            f"layers touched {r['layers']:.2f}"
        )
    print(f"mean: fp32 {mean['fp32']:.4f}, bf16 {mean['bf16']:.4f}, layers {mean['layers']:.2f}")
    print(
        f"sparse delta vs whole, bf16, versions after the first: bytes {delta['bytes_ratio']:.3f} "
        f"({delta['sparse_bytes'] / 1e6:.2f} vs {delta['whole_bytes'] / 1e6:.2f} MB), seconds publish+fetch "
        f"{delta['seconds_ratio']:.2f} ({delta['sparse_seconds']:.3f} vs {delta['whole_seconds']:.3f} s); "
        f"rebuilt == sent: {delta['exact']}"
    )
    print(
        f"bytes per sync (bf16): merged {merged / 1e6:.2f} MB, LoRA r={args.lora_rank} adapters only "
        f"{adapters / 1e6:.2f} MB ({adapters / merged:.3f} of merged)"
    )
    write_result(
        args.out,
        {
            "benchmark": "weight_changes",
            "machine": machine_info(),
            "config": {
                "steps": args.steps,
                "size": args.size,
                "params": params,
                "lora_rank": args.lora_rank,
                "lr": cfg.learner.lr,
            },
            "per_version": rows,
            "mean": mean,
            "bytes_merged_bf16": merged,
            "bytes_lora_adapters_bf16": adapters,
            "sparse_delta": delta,
            "headline": headline("bf16 elements changed per step", mean["bf16"], "report", None),
        },
    )
    return 0 if delta["exact"] else 1


def run_job(args: argparse.Namespace, work: Path):
    """The demo's job (at `--size`, `--lr`) for `--steps` steps on a local Ray instance, every version
    kept on disk; returns its config."""
    from actors.job import Job
    from rlhf_cluster.config import load_config

    overrides = [
        f"run_dir={work / 'run'}",
        f"train.total_steps={args.steps}",
        "train.progress=false",
        "weights.persist_every=1",
        f"weights.keep={args.steps + 1}",
        "data.eval_prompts=0",
        "checkpoint.every_steps=1000",
    ]
    size = SIZES[args.size]
    if size:
        hidden, layers = size
        overrides += [
            f"model.tiny.hidden_size={hidden}",
            f"model.tiny.num_layers={layers}",
            f"model.tiny.num_heads={hidden // 64}",
            "model.tiny.num_kv_heads=4",
            f"model.tiny.intermediate_size={4 * hidden}",
            "model.sft_warmup_steps=0",
            "train.prompts_per_step=4",
            "generation.sampling.n=4",
        ]
    if args.lr is not None:
        overrides.append(f"learner.lr={args.lr}")
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, _temp_dir=str(work / "ray"))
    try:
        with Job(cfg) as job:
            job.run()
    finally:
        ray.shutdown()
    return cfg


def changes_per_version(store, versions: list[int]) -> list[dict]:
    """Per version after the first: the share of elements changed since the one before (fp32, and cast
    to bf16) and the share of layers with any change."""
    from rlhf_cluster.weights.buckets import layer_of

    rows = []
    previous = store.load(versions[0])
    for v in versions[1:]:
        current = store.load(v)
        changed = {"fp32": 0, "bf16": 0}
        total = 0
        layers_changed: dict[str, bool] = defaultdict(bool)
        for name, new in current.items():
            old = previous[name]
            total += new.numel()
            diff32 = new.ne(old)
            changed["fp32"] += int(diff32.sum())
            changed["bf16"] += int(new.to(torch.bfloat16).ne(old.to(torch.bfloat16)).sum())
            layers_changed[layer_of(name)] |= bool(diff32.any())
        rows.append(
            {
                "version": v,
                "fp32": changed["fp32"] / total,
                "bf16": changed["bf16"] / total,
                "layers": sum(layers_changed.values()) / len(layers_changed),
            }
        )
        previous = current
    return rows


def sparse_vs_whole(store, versions: list[int]) -> dict:
    """Every stored version through the `direct` transport, whole and as sparse deltas (bf16)."""
    import time

    from rlhf_cluster.config import DirectTransport, WeightsConfig
    from rlhf_cluster.weights.buckets import now
    from rlhf_cluster.weights.registry import build_transport

    objects: list = []

    def put(payload) -> int:
        objects.append(payload.copy())  # as Ray's put: the sender reuses its staging memory
        return len(objects) - 1

    def get(handles: list[int]) -> list:
        return [objects[h] for h in handles]

    def ends(delta: str):
        cfg = WeightsConfig(transport=DirectTransport(delta=delta, full_every=1_000_000))
        return [build_transport(cfg, store, ["full"], torch.bfloat16, put=put, get=get) for _ in range(2)]

    sides = {"whole": ends("none"), "sparse": ends("sparse")}
    totals = {f"{side}_{what}": 0.0 for side in sides for what in ("bytes", "seconds")}
    exact = True
    for i, v in enumerate(versions):
        state = {k: t.to(torch.bfloat16) for k, t in store.load(v).items()}
        created = now()
        for side, (sender, engine) in sides.items():
            begun = time.perf_counter()
            delivery = sender.publish(v, created, iter(state.items()), {}, snapshot=False).result().delivery
            fetched = engine.fetch(delivery, "full", "engine")
            seconds = time.perf_counter() - begun
            got = dict(fetched.tensors)
            exact &= all(torch.equal(got[k], t) for k, t in state.items())
            if i > 0:  # the first version goes whole on both sides
                totals[f"{side}_bytes"] += fetched.nbytes
                totals[f"{side}_seconds"] += seconds
    return {
        **totals,
        "bytes_ratio": totals["sparse_bytes"] / totals["whole_bytes"],
        "seconds_ratio": totals["sparse_seconds"] / totals["whole_seconds"],
        "exact": exact,
    }


if __name__ == "__main__":
    sys.exit(main())
