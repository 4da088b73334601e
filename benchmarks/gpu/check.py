"""`make gpu-check`: everything issues 54, 69 and 70's "Done when" lists are read from, on a GPU machine.

Steps, each a subprocess with its own time limit (a step that fails or runs out of time is
recorded as such and the next one runs):
1. `pytest tests/gpu` (the CUDA halves; the CPU bodies run in `make test`);
2. `benchmarks.gpu.learner` at Qwen2.5-0.5B and 1.5B: ours (`auto`'s attention and log-prob head)
   at the default batch and at 1k, 4k, 16k and 32k tokens per sequence, MFU both ways, beside the
   plain loop; at 0.5B also FlexAttention and varlen at those lengths and SDPA and the chunked head
   at the default batch; at 1.5B the memory plan given 40 GiB;
3. `benchmarks.gpu.paths` at 0.5B: the scoring pool's reference forward (bf16, int8) and the weight path's
   host hop; the host hop alone at 1.5B (issue 55: >= 25 GB/s in bf16) (`--all` on a GPU);
4. `benchmarks.gpu.step_profile` at 0.5B: where one step's kernel time goes and its kernel launches,
   ours beside the plain loop;
5. `benchmarks.gpu.compile_parity`: learner.compile against eager per parameter under each
   candidate fix, naming the cause;
6. `benchmarks.gpu.learner` on a mixture of experts (issue 70): a random Qwen3-MoE of 1.6B
   parameters, 0.59B active (`models.MOE_SHAPES`), ours beside the plain loop, MFU on active
   parameters;
7. `benchmarks.gpu.vlm_learner` (issue 71): one learner step of a random Qwen2.5-VL-3B (3.75B
   parameters: language model 3.09B, vision tower 0.67B, frozen) on 8 rows of one 448x448 image
   (256 image tokens) each, ours alone: seconds per step, tokens/s, peak memory, MFU;
8. 0.5B again with DeepSpeed ZeRO-3 (last: the slowest to start; `--all` on a GPU).
Writes `--out-dir`/gpu_check.json (every step's status, seconds and result JSON; rewritten after
every step, so a call cut short keeps the steps it ran) and prints one table of the figures.
`--only STEP ...` runs those steps alone (issue 70's figure: `--only "learner MoE"`; issue 71's:
`--only "learner VLM"`). On a GPU the steps of `EARLIER_ISSUES` (measured) run with `--all` only.
Without CUDA the steps run at tiny shapes on the CPU (`--smoke` is then implied), two at a time
(`run_in_lanes`): what `tests/integration/test_gpu_check.py` runs so this check cannot rot. The
1.5B steps are left out of that run (`SMOKE_SAME_AS`): at the tiny shape they are the 0.5B steps
again; their GPU commands are parsed by `tests/unit/test_bench_helpers.py` instead. The VLM step is
left out of that run too (`SMOKE_IN_UNIT_TEST`): its body runs at a tiny shape in its own unit test.

    bash scripts/gpu_check.sh [WHEEL_DIR]      # installs what the machine lacks from WHEEL_DIR, then this
    python3 -m benchmarks.gpu.check [--out-dir DIR] [--smoke] [--all] [--skip STEP ...] [--only STEP ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import REPO, RESULTS_DIR, machine_info, print_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR / "gpu_check")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one rep (implied without CUDA)")
    p.add_argument("--seq-lens", type=int, nargs="*", default=None, help="the learner's --seq-lens (0.5B and 1.5B)")
    p.add_argument("--skip", nargs="*", default=[], help="steps to leave out, by name")
    p.add_argument("--only", nargs="*", default=None, help="run these steps alone, by name (tests/gpu is one)")
    p.add_argument("--all", action="store_true", help=f"on a GPU also the steps {', '.join(EARLIER_ISSUES)}")
    return p.parse_args(argv)


# The steps after the tests, in the order they run (the figures the issue is read by first; a step
# that runs out of time writes nothing, so the optional sides come last, in their own step): its
# name, its module of `benchmarks.gpu` and its result file under --out-dir. Each machine's flags and
# time limits are in `smoke_flags` and `gpu_flags`.
STEPS = (
    ("learner 0.5B", "learner", "gpu_learner_0.5b.json"),
    ("learner 1.5B", "learner", "gpu_learner_1.5b.json"),
    ("scoring and host hop 0.5B", "paths", "gpu_paths_0.5b.json"),
    ("host hop 1.5B", "paths", "gpu_paths_1.5b.json"),
    ("profile 0.5B", "step_profile", "gpu_profile_0.5b.json"),
    ("compile parity", "compile_parity", "gpu_compile_parity.json"),
    ("learner MoE", "learner", "gpu_learner_moe.json"),
    ("learner VLM", "vlm_learner", "gpu_learner_vlm.json"),
    ("learner 0.5B, more sides", "learner", "gpu_learner_0.5b_more.json"),
)
# Steps whose figures are measured (issues 54, 55 and the profile: one H200, 2026-11-26 and -27; the
# compile parity verdict and issues 70's and 71's steps: one H200, 2026-11-28): on a GPU they run with
# `--all` only, so issue 69's open steps fit one 10-minute call (the last, DeepSpeed and compile at 0.5B,
# is the one a call cut short loses); at tiny shapes on the CPU they run too (but for
# `SMOKE_SAME_AS` and `SMOKE_IN_UNIT_TEST`), so none of them can rot.
EARLIER_ISSUES = (
    "scoring and host hop 0.5B",
    "host hop 1.5B",
    "profile 0.5B",
    "compile parity",
    "learner MoE",
    "learner VLM",
)
# Steps that at tiny shapes would run the module another step runs, on the same shape, with a subset
# of its flags (learner 1.5B: ours without the plain loop, sides the 0.5B step times too; host hop
# 1.5B: the 0.5B step's second part; 0.5B's more sides: DeepSpeed, which the smoke 0.5B step times
# too): what tells them apart on a GPU is the shape, the memory budget and each call's time limit,
# which the smoke run has no use for. The CPU run leaves them out (~8 s each: a process importing
# torch for nothing new); `--only` still runs one. Their GPU commands are parsed by the modules'
# own parsers in tests/unit/test_bench_helpers.py, which the smoke run never did.
SMOKE_SAME_AS = {
    "learner 1.5B": "learner 0.5B",
    "host hop 1.5B": "scoring and host hop 0.5B",
    "learner 0.5B, more sides": "learner 0.5B",
}
# How many steps the CPU run runs at once (`run_in_lanes`); a GPU runs one at a time.
SMOKE_LANES = 2
_REPORT_LOCK = threading.Lock()
# Steps whose body the CPU run leaves to a unit test of its own at the same tiny shape (a step
# costs a process importing torch and transformers; `--only` still runs one here).
SMOKE_IN_UNIT_TEST = {"learner VLM": "tests/unit/test_gpu_vlm_shape.py"}


def steps(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of every step: tests/gpu first, then `STEPS`. On the
    GPU the tests' CUDA halves (the CPU halves run in `make test`); at tiny shapes on the CPU
    tests/gpu's bodies run in `make test` already, so here they are only collected."""
    tests = [sys.executable, "-m", "pytest", str(REPO / "tests" / "gpu"), "-q", "-p", "no:cacheprovider"]
    if args.smoke:
        first, flags = ("tests/gpu", [*tests, "--collect-only"], 300), smoke_flags(args)
    else:
        first, flags = ("tests/gpu", [*tests, "-k", "cuda"], 200), gpu_flags(args)  # 144 s on one H200, 2026-11-28
    return [first] + [
        (name, _command(module, *flags[name][0], "--out", str(args.out_dir / result)), flags[name][1])
        for name, module, result in STEPS
    ]


def smoke_flags(args: argparse.Namespace) -> dict[str, tuple[list[str], int]]:
    """Each step's flags and time limit at tiny shapes on the CPU."""
    seq = [str(n) for n in (args.seq_lens if args.seq_lens is not None else [256])]
    batch = "--batch 2 --prompt 8 --response 4 16 --reps 1 --warmup 0 --logprob-tokens".split()
    tiny = ["--shape", "smoke", *batch]
    return {
        # DeepSpeed's side here too: on a GPU it has a step of its own ("learner 0.5B, more sides")
        "learner 0.5B": (
            [*tiny, "--attention", "eager", "--seq-lens", *seq, "--tokens-per-step", "512", "--deepspeed"],
            300,
        ),
        "learner 1.5B": ([*tiny, "--no-plain"], 300),
        "scoring and host hop 0.5B": (["--shape", "smoke", "--rollouts", "2"], 300),
        "host hop 1.5B": (["--shape", "smoke", "--parts", "host_hop"], 300),
        "profile 0.5B": (["--shape", "smoke", "--top", "5"], 300),
        # Dynamo's tracing alone (~20 s): tests/gpu compares inductor's layers with eager ones on the CPU
        "compile parity": (["--shape", "smoke", "--variants", "dynamo only", "--no-confirm"], 300),
        "learner MoE": (["--shape", "moe-smoke", *batch], 300),  # the tiny MoE's size: 8 experts, top-2
        "learner VLM": (["--shape", "vlm-smoke", "--rows", "2", "--reps", "1", "--warmup", "0"], 300),
        "learner 0.5B, more sides": ([*tiny, "--no-plain", "--deepspeed"], 300),
    }


def gpu_flags(args: argparse.Namespace) -> dict[str, tuple[list[str], int]]:
    """Each step's flags and time limit at 0.5B and 1.5B on the GPU (issue 69): ours (auto's
    attention and log-prob head: varlen on CUDA since 2026-11-28) at 1k, 4k, 16k and 32k tokens per
    sequence, 32k tokens a step, beside FlexAttention and varlen at those lengths (0.5B) and SDPA and
    the chunked head at the default batch; 1.5B with the memory plan given 40 GiB; last, 0.5B with
    DeepSpeed and with learner.compile (`--compile`: ~50 s of compilation; allowed on CUDA since the
    parity verdict, its speed unmeasured). With the tests' 200 s the limits add up to 580 s, ~620 s
    with the wheels' install: a 10-minute call cut short loses the last step only (on one H200,
    2026-11-28: tests/gpu 144 s, 0.5B 120 s). `--all` adds the steps of `EARLIER_ISSUES` (measured:
    the compile parity bisect 83 s, issue 70's MoE and 71's VLM steps 104 s together, 2026-11-28; the
    host hops and the profile ~64, ~33 and ~40 s, 2026-11-26); `--only STEP ...` runs chosen ones
    (`--only "learner MoE" "learner VLM"`: 70's and 71's figures again)."""
    seq = [str(n) for n in (args.seq_lens if args.seq_lens is not None else [1024, 4096, 16384, 32768])]
    lengths = ["--reps", "3", "--warmup", "1", "--seq-lens", *seq, "--tokens-per-step", "32768"]
    return {
        "learner 0.5B": (
            [
                "--shape",
                "qwen2.5-0.5b",
                *lengths,
                "--attention",
                "flex_attention",
                "sdpa",
                "varlen",
                "--side",
                "chunked head:logprob_head=chunked",
                "--seq-len-sides",
                "ours",
                "ours, flex_attention",
                "ours, varlen",
            ],
            130,
        ),
        "learner 1.5B": (["--shape", "qwen2.5-1.5b", *lengths, "--memory-budget-gib", "40"], 130),
        "scoring and host hop 0.5B": (["--shape", "qwen2.5-0.5b"], 35),
        "host hop 1.5B": (["--shape", "qwen2.5-1.5b", "--parts", "host_hop"], 25),
        "profile 0.5B": (["--shape", "qwen2.5-0.5b"], 40),
        "compile parity": (["--shape", "tiny", "--no-confirm"], 100),
        "learner MoE": (["--shape", "qwen3-moe-1.6b-a0.6b", "--reps", "3", "--warmup", "1"], 150),
        "learner VLM": (["--shape", "qwen2.5-vl-3b", "--rows", "8", "--reps", "3", "--warmup", "1"], 120),
        "learner 0.5B, more sides": (
            ["--shape", "qwen2.5-0.5b", "--reps", "3", "--no-plain", "--deepspeed", "--compile"],
            120,
        ),
    }


def _command(module: str, *flags: str) -> list[str]:
    """`python -m benchmarks.gpu.<module>` with `flags`."""
    return [sys.executable, "-m", f"benchmarks.gpu.{module}", *flags]


def run_step(name: str, command: list[str], limit: int, log: Path) -> dict:
    print(f"[gpu-check] {name}: {' '.join(command[1:])} (limit {limit} s)", flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    }
    start = time.perf_counter()
    with log.open("w") as fh:
        try:
            rc = subprocess.run(
                command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=limit
            ).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit} s"
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").splitlines()[-40:]
    print("\n".join(f"    {line}" for line in tail), flush=True)
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s", flush=True)
    return {"status": status, "seconds": seconds, "command": command[1:], "log": str(log), "tail": tail[-12:]}


def _count(n: int) -> str:
    """A parameter count in billions, or millions below one billion."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _parameters_note(cfg: dict) -> str:
    """A learner result's parameters where its MFU counts some of them: an MoE's active ones, a
    vision-language model's language model (and its image tokens); "" for a dense text model."""
    if "vision_parameters" in cfg:
        return (
            f"LM {_count(cfg['language_parameters'])} + vision {_count(cfg['vision_parameters'])}, "
            f"{cfg['image_tokens']} image tok"
        )
    if cfg.get("active_parameters", 0) != cfg.get("parameters", 0):
        return f"{_count(cfg['active_parameters'])} of {_count(cfg['parameters'])} active"
    return ""


def summary_rows(report: dict) -> list[list]:
    """One row per figure the issue's Done-when reads: side, batch, s/step, MFU (6·N and with
    attention), peak GiB, x plain."""
    rows = []
    for step in ("learner 0.5B", "learner 1.5B", "learner MoE", "learner VLM", "learner 0.5B, more sides"):
        result = report["steps"].get(step, {}).get("result") or {}
        for name, f in (result.get("figures") or {}).items():
            note = _parameters_note(result.get("config") or {})
            rows.append(
                [
                    f"{step}: {name}",
                    f.get("real_tokens"),
                    f.get("seconds_per_step"),
                    f.get("mfu"),
                    f.get("mfu_with_attention"),
                    f.get("peak_memory_gib"),
                    f.get("vs_plain"),
                    f.get("error", "")[:30] or note,
                ]
            )
    paths = report["steps"].get("scoring and host hop 0.5B", {}).get("result") or {}
    for name, r in (paths.get("reference_forward") or {}).items():
        rows.append(
            [
                f"scoring 0.5B: {name}",
                r.get("tokens"),
                r.get("seconds"),
                r.get("mfu"),
                r.get("mfu_with_attention"),
                r.get("peak_memory_gib"),
                None,
                "",
            ]
        )
    parity = report["steps"].get("compile parity", {}).get("result") or {}
    if parity:
        rows.append(
            [
                "compile parity: " + str(parity.get("verdict"))[:60],
                None,
                None,
                None,
                None,
                None,
                None,
                f"first passing: {parity.get('first_passing')}",
            ]
        )
    for side in (report["steps"].get("profile 0.5B", {}).get("result") or {}).get("sides", []):
        rows.append(
            [
                f"profile 0.5B: {side['side']}, kernel time",
                None,
                side["device_busy_s"],
                None,
                None,
                None,
                None,
                f"{side['kernel_launches']} launches",
            ]
        )
    for shape, step in (("0.5B", "scoring and host hop 0.5B"), ("1.5B", "host hop 1.5B")):
        hop = (report["steps"].get(step, {}).get("result") or {}).get("host_hop") or {}
        for name, r in hop.items():
            rows.append(
                [
                    f"host hop {shape}: {name}",
                    None,
                    r.get("seconds"),
                    None,
                    None,
                    None,
                    None,
                    f"{r['gb_per_s']:.1f} GB/s",
                ]
            )
    return rows


def wanted(args: argparse.Namespace, name: str) -> bool:
    """Whether step `name` runs: named by `--only` where given, else not `--skip`ped; on a GPU
    without `--all`, not one of `EARLIER_ISSUES`; at tiny shapes, not one of `SMOKE_SAME_AS` or
    `SMOKE_IN_UNIT_TEST`."""
    if args.only is not None:
        return name in args.only
    if args.smoke:
        return name not in args.skip and name not in SMOKE_SAME_AS and name not in SMOKE_IN_UNIT_TEST
    return name not in args.skip and (args.all or name not in EARLIER_ISSUES)


def step_entry(args: argparse.Namespace, name: str, command: list[str], limit: int) -> dict:
    """Runs one step and returns its report entry, with its result JSON when it wrote one."""
    slug = name.replace("/", "_").replace(" ", "_").replace(".", "")
    entry = run_step(name, command, limit, args.out_dir / f"{slug}.log")
    out = next((Path(c) for c, prev in zip(command[1:], command) if prev == "--out"), None)
    if out is not None and out.is_file() and entry["status"] == "ok":
        entry["result"] = json.loads(out.read_text())
    return entry


def run_in_lanes(args: argparse.Namespace, chosen: list, report: dict, begun: float) -> None:
    """The CPU run's steps, `SMOKE_LANES` at a time: at tiny shapes a step is mostly a process
    importing torch and transformers, one core's work, and the machine has more. The first step
    that builds a model (every step after tests/gpu's collection) runs before the later ones start,
    as they load the smoke models it saves in the shared cache. The report is written as each step
    ends and, at the end, in the steps' order. On a GPU the steps run one at a time (`main`): each
    times the device alone."""
    futures: dict[str, Future] = {}
    with ThreadPoolExecutor(SMOKE_LANES) as pool:
        for name, command, limit in chosen:
            futures[name] = pool.submit(step_entry, args, name, command, limit)
            futures[name].add_done_callback(partial(_record, args, report, begun, name))
            if name != "tests/gpu" and len(futures) == 1 + ("tests/gpu" in futures):
                wait([futures[name]])  # the models' builder, alone
    for name, future in futures.items():  # in the steps' order (a step that raised raises here)
        report["steps"].pop(name, None)
        report["steps"][name] = future.result()


def _record(args: argparse.Namespace, report: dict, begun: float, name: str, done: Future) -> None:
    """A step's entry in the report, written at once (a run cut short keeps it)."""
    if done.exception() is not None:
        return
    with _REPORT_LOCK:
        report["steps"][name] = done.result()
        write_report(args, report, begun, finished=False)


def write_report(args: argparse.Namespace, report: dict, begun: float, finished: bool) -> None:
    """gpu_check.json as it stands: after every step (`finished` False), so a call cut short keeps
    the results of the steps it ran, and once at the end."""
    report["seconds"] = time.perf_counter() - begun
    report["ok"] = all(e["status"] == "ok" for e in report["steps"].values())
    report["finished"] = finished
    (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    args.smoke = args.smoke or not cuda
    args.out_dir.mkdir(parents=True, exist_ok=True)

    report: dict = {"benchmark": "gpu_check", "machine": machine_info(), "smoke": args.smoke, "steps": {}}
    report["left_out_as_same"] = {n: s for n, s in SMOKE_SAME_AS.items() if args.smoke and not wanted(args, n)}
    report["left_out_to_unit_tests"] = {
        n: t for n, t in SMOKE_IN_UNIT_TEST.items() if args.smoke and not wanted(args, n)
    }
    begun = time.perf_counter()
    chosen = [step for step in steps(args) if wanted(args, step[0])]
    if args.smoke:
        run_in_lanes(args, chosen, report, begun)
    else:
        for name, command, limit in chosen:
            report["steps"][name] = step_entry(args, name, command, limit)
            write_report(args, report, begun, finished=False)
    write_report(args, report, begun, finished=True)
    print(
        f"\ngpu-check on {report['machine']['cuda'] or 'cpu (smoke)'}: {report['seconds']:.0f} s; "
        + ", ".join(f"{n} {e['status']}" for n, e in report["steps"].items())
    )
    print_table(
        ["figure", "real tok", "seconds", "MFU", "MFU+attn", "peak GiB", "x plain", "note"],
        summary_rows(report),
        ["{}", "{}", "{:.3f}", "{:.1%}", "{:.1%}", "{:.1f}", "{:.2f}", "{}"],
    )
    print(f"wrote {args.out_dir / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
