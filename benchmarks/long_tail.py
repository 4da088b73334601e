"""Long-tail generation: in-flight weight updates (streaming) vs waiting for whole batches.

RL response lengths have a long tail. Both sides generate the same number of prompt groups on the
same vLLM engine (`VLLMEngine`, one process) from a tiny model whose EOS probability is raised so
that response lengths spread over more than 10x (`ensure_long_tail_model`; the spread measured is
reported), while a publisher thread makes a new weight version every `--publish-every` seconds, as a
learner would, and hands it over by `--transport`: `direct` (the default: the learner side packs
checksummed engine-dtype buckets, the engine side verifies them all and loads them, as
`weights.transport: direct` does, minus the object store: both ends share this process) or
`filesystem` (a real `WeightStore`, written and read back with its checksums):

- **batched**: requests of `--batch-groups` groups; each returns when its slowest response has
  finished; the newest version is loaded between requests (the engine is idle then).
  This is `generation.mode: batched`.
- **streaming**: up to `--batch-groups` groups in flight; a finished group is replaced by a new
  one at once, and each new version is loaded in flight at a token boundary (unfinished responses
  resume with their KV recomputed). This is `generation.mode: streaming` with
  `in_flight_update: resume`.
- **streaming_no_loads**: the same, but it ignores the published versions. It separates the gain
  of continuous batching from the cost of the in-flight loads: the recompute of the unfinished
  responses' KV after each load.

Same concurrency cap on both sides; the sides alternate (rotated order) over `--reps`. Reported:
samples/s (and tokens/s) per side, the ratio streaming / batched, weight loads and the pause they
cost, and the share of samples that spanned two versions.

    .venv/bin/python -m benchmarks.long_tail [--groups 48 --batch-groups 8 --reps 2 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from functools import partial
from pathlib import Path

import torch

from benchmarks._timing import median, rotated
from benchmarks.common import headline, machine_info, print_table, qwen2_shape, result_path, write_result
from rlhf_cluster.weights.buckets import DeliveryManifest

TARGET = 1.12  # the low end of the 12-40% gains AReaL, slime and PipelineRL report
DEFAULT_OUT = result_path("long_tail")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=48, help="prompt groups per side and repetition")
    p.add_argument(
        "--batch-groups", type=int, default=8, help="groups per batched request = groups in flight when streaming"
    )
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument(
        "--eos-rate", type=float, default=0.03, help="mean EOS probability per position (sets the length spread)"
    )
    p.add_argument("--publish-every", type=float, default=1.0, help="seconds between published versions")
    p.add_argument(
        "--hidden",
        type=int,
        default=64,
        help="model width (64: the demo's tiny model; 512+: a model whose "
        "small-batch decode is memory-bound, as on a GPU)",
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument(
        "--transport", choices=["direct", "filesystem"], default="direct", help="how versions reach the engine"
    )
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models", help="tiny model cache")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    return p.parse_args(argv)


class Publisher:
    """Publishes perturbed weights as versions 1, 2, ... every `every` seconds until stopped."""

    def __init__(self, store, state: dict, every: float):
        self.store, self.state, self.every = store, state, every
        self.version = store.latest_version()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        generator = torch.Generator().manual_seed(0)
        while not self._stop.wait(self.every):
            noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in self.state.items()}
            self.store.publish(self.version + 1, noisy)
            self.version += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class DirectChannel:
    """The direct transport's two ends in one process: `publish` packs a version into checksummed
    engine-dtype buckets (no disk); `load` checks every bucket and returns the tensors to load."""

    def __init__(self, bucket_bytes: int = 64 << 20):
        self.bucket_bytes = bucket_bytes
        self.newest: tuple[DeliveryManifest, list] | None = None  # (manifest, payloads)

    def publish(self, version: int, state: dict) -> None:
        from rlhf_cluster.weights.buckets import VersionPacker, now

        self.newest = VersionPacker(version, now(), "full", torch.float32, self.bucket_bytes, lambda p: p).pack(
            state.items()
        )

    def latest_version(self) -> int | None:
        return None if self.newest is None else self.newest[0].version

    def load(self, version: int) -> dict:
        from rlhf_cluster.weights.buckets import verified_tensors

        assert self.newest is not None, "publish first"
        manifest, payloads = self.newest
        if manifest.version != version:
            raise FileNotFoundError(version)  # a newer one landed meanwhile: the caller takes that next
        return dict(verified_tensors(manifest, payloads)[0])


def load_newest(engine, store) -> tuple[int, float] | None:
    """Load the store's newest version if the engine lacks it; returns (version, engine pause seconds)."""
    latest = store.latest_version()
    if latest is None or latest == engine.version:
        return None
    try:
        weights = store.load(latest)
    except FileNotFoundError:
        return None  # retention removed it; the next call takes the newer one
    swap = engine.load_weights(latest, weights.items())
    return latest, swap.paused_seconds


def run_batched(engine, store, prompts, args) -> dict:
    rollouts, pauses = [], []
    for i in range(0, len(prompts), args.batch_groups):
        loaded = load_newest(engine, store)
        if loaded:
            pauses.append(loaded[1])
        batch, _ = engine.generate(prompts[i : i + args.batch_groups])
        rollouts.extend(batch)
    return {"rollouts": rollouts, "pauses": pauses}


def run_streaming(engine, store, prompts, args, follow: bool = True) -> dict:
    pauses: list[float] = []
    done = threading.Event()

    def follow_versions() -> None:  # what the driver's version push does
        while follow and not done.wait(0.01):
            loaded = load_newest(engine, store)
            if loaded:
                pauses.append(loaded[1])

    loader = threading.Thread(target=follow_versions, daemon=True)
    loader.start()
    rollouts, queue = [], list(prompts)
    in_flight: set[Future] = set()
    try:
        while queue or in_flight:
            while queue and len(in_flight) < args.batch_groups:
                in_flight.add(engine.submit_group(queue.pop(0)))
            finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                rollouts.extend(future.result())
    finally:
        done.set()
        loader.join()
    return {"rollouts": rollouts, "pauses": pauses}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from rlhf_cluster.config import GenerationConfig, SamplingConfig
    from rlhf_cluster.data.prompts import Prompt
    from rlhf_cluster.data.tasks import arithmetic_rows
    from rlhf_cluster.generation.engine import VLLMEngine
    from rlhf_cluster.models.modeling import load_causal_lm
    from rlhf_cluster.models.tiny_model import ensure_long_tail_model, ensure_tiny_model

    kv_heads = max(1, args.hidden // 64 // 4)
    tiny = qwen2_shape(args.hidden, args.layers, kv_heads, positions=max(256, args.max_new_tokens + 64))
    model_dir = ensure_long_tail_model(
        ensure_tiny_model(tiny, args.cache_dir), args.eos_rate, Path(args.cache_dir) / "long-tail"
    )
    sampling = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens)
    gen_cfg = GenerationConfig(sampling=sampling, max_model_len=tiny.max_position_embeddings, mode="streaming")
    rows = arithmetic_rows(args.groups, seed=0, split="bench")
    prompts = [Prompt(r["prompt_id"], r["prompt"], r["answer"]) for r in rows]
    engine = VLLMEngine(str(model_dir), gen_cfg, seed=0, name="bench")
    state = load_causal_lm(model_dir).state_dict()
    engine.generate(prompts[: args.batch_groups])  # warm-up
    timings, lengths = time_sides(args, engine, state, prompts)
    engine.close()

    med = {side: {k: median(t[k] for t in ts) for k in ts[0] if k != "rep"} for side, ts in timings.items()}
    ratio = med["streaming"]["samples_per_s"] / med["batched"]["samples_per_s"]
    spread = {
        "min": min(lengths),
        "p10": statistics.quantiles(lengths, n=10)[0],
        "median": statistics.median(lengths),
        "p90": statistics.quantiles(lengths, n=10)[-1],
        "max": max(lengths),
    }
    print(f"response lengths: {spread} (p90/p10 = {spread['p90'] / max(spread['p10'], 1):.1f}x)")
    print_table(
        ["side", "samples/s", "tokens/s", "seconds", "weight loads", "pause s", "multi-version"],
        [
            [
                side,
                m["samples_per_s"],
                m["tokens_per_s"],
                m["seconds"],
                m["weight_loads"],
                m["pause_seconds_total"],
                m["multi_version_fraction"],
            ]
            for side, m in med.items()
        ],
        ["{}", "{:.1f}", "{:.0f}", "{:.2f}", "{:.0f}", "{:.4f}", "{:.2f}"],
    )
    print(f"streaming / batched samples/s: {ratio:.2f}x (target >= {TARGET}x), transport {args.transport}")
    result = {
        "benchmark": "long_tail",
        "machine": machine_info(),
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "model_dir": str(model_dir)},
        "response_lengths": spread,
        "timings": timings,
        "median": med,
        "headline": headline("streaming/batched samples/s", ratio, f">= {TARGET}x", ratio >= TARGET, "x"),
    }
    write_result(args.out, result)
    return result


def time_sides(args: argparse.Namespace, engine, state: dict, prompts: list) -> tuple[dict[str, list[dict]], list[int]]:
    """Every side per repetition (order rotated), each from version 0 on a store of its own while a
    publisher makes new versions: per side one row per repetition; every response's length."""
    from rlhf_cluster.weights import WeightStore

    runs: dict[str, Callable[..., dict]] = {
        "batched": run_batched,
        "streaming": run_streaming,
        "streaming_no_loads": partial(run_streaming, follow=False),
    }
    timings: dict[str, list[dict]] = {side: [] for side in runs}
    lengths: list[int] = []
    with tempfile.TemporaryDirectory(prefix="long-tail-") as tmp:
        for rep in range(args.reps):
            for side in rotated(tuple(runs), rep):
                store = (
                    DirectChannel() if args.transport == "direct" else WeightStore(Path(tmp) / f"{side}-{rep}", keep=3)
                )
                store.publish(0, state)
                load_newest(engine, store) or engine.load_weights(0, store.load(0).items())
                start = time.perf_counter()
                with Publisher(store, state, args.publish_every) as publisher:
                    out = runs[side](engine, store, prompts, args)
                seconds = time.perf_counter() - start
                rollouts = out["rollouts"]
                lengths += [len(r.response_ids) for r in rollouts]
                timings[side].append(
                    {
                        "rep": rep,
                        "seconds": seconds,
                        "samples": len(rollouts),
                        "samples_per_s": len(rollouts) / seconds,
                        "tokens_per_s": sum(len(r.response_ids) for r in rollouts) / seconds,
                        "versions_published": publisher.version,
                        "weight_loads": len(out["pauses"]),
                        "pause_seconds_total": sum(out["pauses"]),
                        "multi_version_fraction": statistics.fmean(len(r.policy_versions) > 1 for r in rollouts),
                    }
                )
    return timings, lengths


if __name__ == "__main__":
    main()
