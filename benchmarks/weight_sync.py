"""Weight sync: our learner -> weight store -> vLLM engine path vs the raw cost of moving the same bytes.

A random ~100M-parameter Qwen2 (fp32, built in a temp dir with the tiny tokenizer) is served by a
live in-process vLLM engine. Per repetition, with the order rotated every repetition:

- `ours`: `WeightStore.publish(version, state_dict)` (safetensors shards, fsync, sha256 per
  shard, manifest, atomic rename, atomic LATEST; what learner rank 0 runs on its writer thread),
  then what `GenerationWorker.sync` runs: manifest read, lease, `store.load(version)` (sha256
  verify + load), release, and `VLLMEngine.load_weights(version, ...)` (in-place reload + prefix
  cache reset).
- `raw`: `safetensors.torch.save_file(state_dict)` + `load_file` of the same tensors in the same
  directory, each loaded tensor copied once (`load_file` only maps the file; the copy makes
  every byte actually come in, as the engine's reload does): the bytes moved through the same
  filesystem, nothing else.
- `raw_fsync`: `raw` plus an fsync of the file before loading it: what durability alone costs.

Only the filesystem transport exists (`weights.transport: filesystem`; the object_store
transport of DESIGN.md is not implemented), so only it is measured.

    .venv/bin/python benchmarks/weight_sync.py [--layers 12 --hidden 768 --reps 6 --dtype float32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from _common import headline, machine_info, median, print_table, result_path, rotated, write_result
from rlhf_cluster.config import GenerationConfig, SamplingConfig, TinyModelConfig
from rlhf_cluster.tiny_model import ensure_tiny_model
from rlhf_cluster.weights import WeightStore

HEAD_DIM = 64
SIDES = ("ours", "raw", "raw_fsync")
TARGET = 2.0  # ours may take at most twice the raw save + load
DEFAULT_OUT = result_path("weight_sync")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768, help="model width (multiple of 64; heads = hidden/64)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers (768 x 12 with MLP 3072 and 4 KV heads: ~104M params)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="vLLM engine dtype (the store always carries the learner's fp32 weights)")
    p.add_argument("--reps", type=int, default=6, help="timed repetitions per side (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per side first")
    p.add_argument("--dir", default=None, help="filesystem to measure (default: a temp dir under $TMPDIR)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    if args.hidden % HEAD_DIM:
        p.error(f"--hidden must be a multiple of {HEAD_DIM}")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    heads = args.hidden // HEAD_DIM
    tiny = TinyModelConfig(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=heads, num_kv_heads=args.kv_heads,
        intermediate_size=4 * args.hidden, max_position_embeddings=256,
    )
    work = Path(tempfile.mkdtemp(prefix="bench-weight-sync-", dir=args.dir))
    try:
        return _run(args, tiny, heads, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, tiny: TinyModelConfig, heads: int, work: Path) -> int:
    t0 = time.perf_counter()
    model_dir = ensure_tiny_model(tiny, work / "models")
    build_s = time.perf_counter() - t0
    state = load_file(str(model_dir / "model.safetensors"))  # the learner hands the store full fp32 CPU tensors
    params = sum(t.numel() for t in state.values())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())

    from rlhf_cluster.generation.engine import VLLMEngine

    gen_cfg = GenerationConfig(sampling=SamplingConfig(n=1, max_new_tokens=4), max_model_len=tiny.max_position_embeddings)
    t0 = time.perf_counter()
    engine = VLLMEngine(str(model_dir), gen_cfg, dtype=args.dtype, seed=0, name="bench")
    engine_start_s = time.perf_counter() - t0

    store = WeightStore(work / "store", keep=2)
    raw_dir = work / "raw"
    raw_dir.mkdir()
    version = 0

    def run_ours() -> dict:
        nonlocal version
        version += 1
        t = time.perf_counter()
        store.publish(version, state)
        t_pub = time.perf_counter()
        # GenerationWorker.sync: newest version, its manifest, a lease, verified load, release, engine reload.
        latest = store.latest_version()
        store.manifest(latest)
        store.acquire(latest, "bench")
        try:
            weights = store.load(latest)
        finally:
            store.release(latest, "bench")
        t_load = time.perf_counter()
        engine.load_weights(latest, weights.items())
        t_engine = time.perf_counter()
        return {"publish": t_pub - t, "load_verify": t_load - t_pub, "engine_reload": t_engine - t_load}

    def raw(fsync: bool) -> dict:
        path = raw_dir / "model.safetensors"
        t = time.perf_counter()
        save_file(state, str(path))
        if fsync:
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        t_save = time.perf_counter()
        # load_file maps the file lazily: copy every tensor so the bytes are really read into memory.
        loaded = {k: v.clone() for k, v in load_file(str(path)).items()}
        t_load = time.perf_counter()
        assert len(loaded) == len(state)
        path.unlink()
        return {"save": t_save - t, "load": t_load - t_save}

    run = {"ours": run_ours, "raw": lambda: raw(False), "raw_fsync": lambda: raw(True)}
    timings: dict[str, list[dict]] = {s: [] for s in SIDES}
    for rep in range(-args.warmup, args.reps):
        order = rotated(SIDES, rep)
        for side in order:
            parts = run[side]()
            seconds = sum(parts.values())
            if rep >= 0:
                timings[side].append({"rep": rep, "position": order.index(side), "seconds": seconds,
                                      "gb_per_s": nbytes / seconds / 1e9, **parts})

    # The engine serves the last version it loaded (a reload that broke it would show here).
    rollouts, _ = engine.generate([_prompt()])
    sane = all(all(lp == lp and lp <= 0 for lp in r.rollout_logprobs) for r in rollouts) and engine.version == version

    med = {s: {k: median(t[k] for t in ts) for k in ts[0] if k not in ("rep", "position")} for s, ts in timings.items()}
    ratio = med["ours"]["seconds"] / med["raw"]["seconds"]
    ratio_fsync = med["ours"]["seconds"] / med["raw_fsync"]["seconds"]
    store_only = med["ours"]["publish"] + med["ours"]["load_verify"]
    paired = [o["seconds"] / r["seconds"] for o, r in zip(timings["ours"], timings["raw"])]

    print(f"\nweight_sync  Qwen2 hidden={args.hidden} layers={args.layers} heads={heads} kv_heads={args.kv_heads} "
          f"({params / 1e6:.1f}M params, {nbytes / 1e9:.3f} GB fp32) | engine dtype {args.dtype} | transport: filesystem "
          f"(object_store not implemented) | {args.reps} reps (+{args.warmup} warmup), medians")
    print_table(
        ["side", "seconds", "GB/s", "ours/side"],
        [[s, med[s]["seconds"], med[s]["gb_per_s"], med["ours"]["seconds"] / med[s]["seconds"]] for s in SIDES],
        ["{}", "{:.3f}", "{:.3f}", "{:.2f}"],
    )
    print("breakdown (medians, seconds):")
    print_table(
        ["side", "part", "seconds"],
        [["ours", "publish (save + fsync + sha256 + manifest + LATEST)", med["ours"]["publish"]],
         ["ours", "load + sha256 verify", med["ours"]["load_verify"]],
         ["ours", "vLLM engine reload + prefix-cache reset", med["ours"]["engine_reload"]],
         ["raw", "save_file", med["raw"]["save"]],
         ["raw", "load_file + copy", med["raw"]["load"]],
         ["raw_fsync", "save_file + fsync", med["raw_fsync"]["save"]],
         ["raw_fsync", "load_file + copy", med["raw_fsync"]["load"]]],
        ["{}", "{}", "{:.3f}"],
    )
    print(f"ratio ours/raw seconds: {ratio:.2f} (target <= {TARGET:.0f}); store only (publish + load, no engine) / raw: "
          f"{store_only / med['raw']['seconds']:.2f}; ours/raw_fsync: {ratio_fsync:.2f}; engine serves version {engine.version}: {sane}")

    result = {
        "benchmark": "weight_sync",
        "machine": machine_info(),
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "tiny_model": tiny.model_dump(),
                   "params": params, "bytes": nbytes, "tensors": len(state), "model_build_seconds": build_s,
                   "engine_start_seconds": engine_start_s, "work_dir": str(work)},
        "transports_measured": ["filesystem"],
        "transports_not_implemented": ["object_store"],
        "timings": timings,
        "medians": med,
        "ratio_ours_over_raw_seconds": ratio,
        "ratio_ours_over_raw_fsync_seconds": ratio_fsync,
        "ratio_store_only_over_raw_seconds": store_only / med["raw"]["seconds"],
        "paired_ratios_ours_over_raw": paired,
        "median_paired_ratio": median(paired),
        "engine_sane_after_reload": sane,
        "headline": headline("ours/raw seconds (filesystem)", ratio, f"<= {TARGET:.0f}x", ratio <= TARGET, "x"),
    }
    write_result(args.out, result)
    if not sane:
        print("ERROR: the engine's output after the last reload is not sane", file=sys.stderr)
        return 1
    return 0


def _prompt():
    from rlhf_cluster.data.prompts import Prompt

    return Prompt("p0", "1 + 2 =", "3")


if __name__ == "__main__":
    sys.exit(main())
