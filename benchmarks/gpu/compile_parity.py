"""`learner.compile` against eager, gradient by gradient, under each candidate fix: the bisect that
names why compiled decoder layers gave other gradients than eager ones on CUDA (issue 69; one H200,
fp32, SDPA: grad norm 0.462 vs 0.551 at equal losses).

One model (`--shape`, random weights) and one batch of ragged sequences, packed as the learner
packs them. Each variant runs in its own process, so its environment is set before anything in it
compiles: the learner's first update (`FSDP2Learner.train_step`, world size 1) eager, then with
`learner.compile` (the project's regional compile, `rlhf_cluster/models/compiled.py`, run under the
variant's fix through `compiled_as`), and every parameter's gradient compared (max abs difference,
relative L2 error, cosine), worst first, and the worst per kind of parameter (layer index dropped),
so "only the RMSNorm weights differ" reads at a glance.

The variants, in order (the first that passes names the cause; `default` passing means not reproduced):
- `default`: fp32, SDPA, Liger as the learner's default (on CUDA where installed);
- `mix-order reduction off`: `TORCHINDUCTOR_MIX_ORDER_REDUCTION=0` (pytorch#193061, #190796);
- `inputs cloned`: each layer's tensor inputs cloned, none sharing storage (pytorch#191002);
- `liger off` (where Liger is installed): Liger's RMSNorm and SwiGLU left out;
- `eager attention`, `aot_eager backend` (AOTAutograd without Inductor), `dynamo only` (Dynamo's
  graphs run eagerly), `bf16`: where the difference lives when no fix above helps.
Then the fix found is run again under the learner's other settings (bf16, eager attention,
FlexAttention on CUDA, Liger on/off): whether it holds there is whether the switch in
`compiled.py` may flip. On the CPU only `--variants` run (by default `default` alone; at the tiny
shape on 2 cores about 30 s, most of it Dynamo's and AOTAutograd's tracing of the layer and
inductor's C++ compile; `--variants "dynamo only"` about 20 s): a smoke run of the harness, as the
CPU's compiled layers match eager (max relative error 1.3e-6 in fp32; bf16 as far from fp32 as eager
bf16 is, 7.7e-3).

Tolerances: `benchmarks/gpu/gradient_parity.py` (fp32 1e-3 relative L2 error per parameter; bf16
relative to eager bf16's own error against fp32).

    python3 -m benchmarks.gpu.compile_parity --out FILE [--shape tiny|qwen2.5-0.5b] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import REPO, headline, machine_info, result_path, write_result
from benchmarks.gpu.gradient_parity import BF16_FACTOR, FP32_TOLERANCE, bf16_tolerances, compare_gradients, summarize

MIX_ORDER_OFF = {"TORCHINDUCTOR_MIX_ORDER_REDUCTION": "0"}


@dataclass(frozen=True)
class Variant:
    """One way of running the compiled side (and its eager reference): the fix under test and the
    learner settings it runs with; `cause` is what it passing names, where `default` fails."""

    name: str
    cause: str = ""
    env: dict[str, str] = field(default_factory=dict)
    clone_inputs: bool = False
    backend: str = "inductor"
    precision: str = "none"  # learner.mixed_precision
    attention: str = "sdpa"
    liger: bool | None = None  # learner.liger_kernels (None: on CUDA where installed)

    @property
    def is_fix(self) -> bool:
        """Whether it changes how the layers compile rather than which settings they run."""
        return bool(self.env) or self.clone_inputs or self.liger is False


def candidates(liger_installed: bool) -> list[Variant]:
    """The first round, in the order the verdict reads them."""
    out = [
        Variant("default", "not reproduced: compiled layers match eager at this shape"),
        Variant("mix-order reduction off", "Inductor's mix-order reduction (pytorch#193061, #190796)", MIX_ORDER_OFF),
        Variant("inputs cloned", "AOT aliasing of inputs sharing storage (pytorch#191002)", clone_inputs=True),
    ]
    if liger_installed:
        out.append(Variant("liger off", "Liger's RMSNorm or SwiGLU under compile", liger=False))
    return out + [
        Variant("eager attention", "SDPA under compile (eager attention matches)", attention="eager"),
        Variant(
            "aot_eager backend",
            "an Inductor pass other than mix-order reduction (AOTAutograd without Inductor matches): "
            "name it with python -m torch._inductor.compiler_bisector run <this script's --worker command>",
            backend="aot_eager",
        ),
        Variant(
            "dynamo only",
            "AOTAutograd (Dynamo's graphs run eagerly match, aot_eager's do not): its functionalization or "
            "partitioner, beyond the layer's inputs (e.g. FSDP2's parameters)",
            backend="eager",
        ),
        Variant("bf16", "fp32 only (bf16 matches within its tolerance)", precision="bf16"),
    ]


def confirmations(fix: Variant, cuda: bool, liger_installed: bool) -> list[Variant]:
    """The fix under the learner's other settings: it may become the default only where it holds."""
    out = [
        dataclasses.replace(fix, name=f"{fix.name}, bf16", precision="bf16"),
        dataclasses.replace(fix, name=f"{fix.name}, eager attention", attention="eager"),
    ]
    if cuda:
        out.append(dataclasses.replace(fix, name=f"{fix.name}, flex_attention", attention="flex_attention"))
        out.append(
            dataclasses.replace(
                fix, name=f"{fix.name}, bf16 flex_attention", precision="bf16", attention="flex_attention"
            )
        )
    if liger_installed and fix.liger is not False:
        out.append(dataclasses.replace(fix, name=f"{fix.name}, liger off", liger=False))
    return out


def verdict(results: list[dict]) -> dict:
    """From the first round's results (in `candidates` order, each {"variant": asdict, "passed": ...}
    or {"error": ...}): the first variant that passes and the cause it names (none without `default`,
    the failure every other variant is read against)."""
    ran = [r for r in results if "error" not in r]
    first = next((r for r in ran if r["passed"]), None)
    if not any(r["variant"]["name"] == "default" for r in ran):  # a cause reads against the default failing
        name = first["variant"]["name"] if first else None
        return {"first_passing": name, "cause": "not bisected: the default variant did not run", "fix": None}
    if first is None:
        before = any(r["variant"]["backend"] == "aot_eager" for r in ran)
        where = " (aot_eager differs too: before Inductor, in Dynamo or AOTAutograd)" if before else ""
        return {"first_passing": None, "cause": f"none of the candidates{where}", "fix": None}
    variant = first["variant"]
    fix = variant if Variant(**variant).is_fix else None
    return {"first_passing": variant["name"], "cause": variant["cause"], "fix": fix}


# ---- one variant, in its own process -------------------------------------------------------------
def first_update(model_dir: str, batches: list, variant: Variant, compiled: bool) -> dict:
    """The learner's steps over `batches` with `learner.compile` on or off, under the variant's fix
    and settings: the first update's summed loss and every parameter's full gradient (host, fp32),
    each step's gradient norm, and how many layers ran compiled."""
    import gc

    from torch.distributed.tensor import DTensor

    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.learner.base import LearnerSpec
    from rlhf_cluster.learner.fsdp2 import FSDP2Learner
    from rlhf_cluster.models.compiled import CompileFix, compiled_as

    class Capturing(FSDP2Learner):
        captured: dict | None = None

        def _clip_and_step(self, loss, also_read):
            if self.captured is None:
                grads = {}
                for n, p in self.model.named_parameters():
                    if p.grad is not None:
                        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                        grads[n] = g.detach().float().cpu()
                self.captured = {"loss": float(loss), "grads": grads}
            return super()._clip_and_step(loss, also_read)

    # A compiled learner leaves Liger out (learner config: _compile_without_liger), so the eager side does too
    liger = False if variant.liger is None else variant.liger
    settings = {"mixed_precision": variant.precision, "attention": variant.attention, "liger_kernels": liger}
    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "lr": 1e-3, "compile": compiled, **settings}})
    torch.manual_seed(0)
    with compiled_as(CompileFix(dict(variant.env), variant.clone_inputs), variant.backend):
        learner = Capturing(LearnerSpec.of_policy(cfg), model_dir)
    steps = [learner.train_step(b, kl_coef=0.0) for b in batches]
    model = learner.model
    layers = getattr(getattr(model, "model", model), "layers", [])
    out = {
        **(learner.captured or {}),
        "grad_norms": [s["learner/grad_norm"] for s in steps],
        "compiled_layers": sum(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in layers),
        "liger": learner.liger,
    }
    del learner, model, layers
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def run_variant(variant: Variant, model_dir: str, batch) -> dict:
    """Eager and compiled updates of one variant, compared; bf16 against eager fp32 (`bf16_tolerances`)."""
    eager = first_update(model_dir, [batch], variant, compiled=False)
    compiled = first_update(model_dir, [batch], variant, compiled=True)
    tolerance: float | dict[str, float] = FP32_TOLERANCE
    reference = eager["grads"]
    if variant.precision == "bf16":
        fp32 = first_update(model_dir, [batch], dataclasses.replace(variant, precision="none"), compiled=False)
        reference, tolerance = fp32["grads"], bf16_tolerances(fp32["grads"], eager["grads"])
    diffs = compare_gradients(reference, compiled["grads"], tolerance)
    result = {
        "variant": dataclasses.asdict(variant),
        "liger": compiled["liger"],
        "compiled_layers": compiled["compiled_layers"],
        **summarize(diffs, eager["loss"], compiled["loss"]),
    }
    result["passed"] = result["passed"] and compiled["compiled_layers"] > 0  # nothing compiled: nothing shown
    return result


def worker(args: argparse.Namespace) -> int:
    """`--worker`: one variant; exit 0 where it passes, 1 where not (a command for torch's
    compiler_bisector), the figures in `--result`."""
    import torch.distributed as dist

    from benchmarks.gpu.models import batch_of, join_one_rank_group

    variant = Variant(**json.loads(args.worker))
    join_one_rank_group()
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model_dir).vocab_size
    batch = batch_of(args.sequences, args.prompt, args.response, vocab)
    result = run_variant(variant, args.model_dir, batch)
    dist.destroy_process_group()
    if args.result:
        Path(args.result).write_text(json.dumps(result, default=str))
    print(
        f"{variant.name}: {'passes' if result['passed'] else 'fails'}, max rel L2 {result['max_rel_l2']:.2e}, "
        f"failing kinds {result['failing_kinds']}",
        flush=True,
    )
    return 0 if result["passed"] else 1


# ---- the variants' processes and the report ------------------------------------------------------
def run_all(variants: list[Variant], args: argparse.Namespace, model_dir: Path) -> list[dict]:
    """Each variant in its own process (its environment set before it starts), `--jobs` at a time;
    results in `variants`' order, an {"error": ...} for one that failed to run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Inductor compiles kernels in a pool of its own per process: the machine's cores shared between the jobs.
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    batch = ["--sequences", str(args.sequences), "--prompt", str(args.prompt), "--response", *map(str, args.response)]

    def one(variant: Variant) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            command = [
                sys.executable,
                "-m",
                "benchmarks.gpu.compile_parity",
                "--worker",
                json.dumps(dataclasses.asdict(variant)),
                "--model-dir",
                str(model_dir),
                "--result",
                str(out),
                *batch,
            ]
            try:
                run = subprocess.run(
                    command,
                    cwd=REPO,
                    env={**env, **variant.env},
                    capture_output=True,
                    text=True,
                    timeout=args.worker_timeout,
                )
                tail = (run.stdout + run.stderr)[-1500:]
            except subprocess.TimeoutExpired:
                return {"variant": dataclasses.asdict(variant), "error": f"timed out after {args.worker_timeout} s"}
            if not out.is_file():
                return {"variant": dataclasses.asdict(variant), "error": f"exit {run.returncode}: {tail}"}
            print(tail.strip().splitlines()[-1], flush=True)
            # The command again (exit 0 where it passes): what torch's compiler_bisector runs to name a pass.
            return {**json.loads(out.read_text()), "command": command[1:]}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return list(pool.map(one, variants))


def switch_advice(found: dict, holds: bool) -> str:
    """What the result means for `learner.compile` on CUDA (`rlhf_cluster/models/compiled.py`)."""
    from rlhf_cluster.models.compiled import CUDA_FIX

    fix = found["fix"]
    if found["cause"].startswith("not bisected"):
        return "none: run the default variant (the failure the others are read against)"
    if fix is None:
        if found["first_passing"] == "default":
            return "not reproduced here: run tests/gpu's parity test; if it passes too, flip CUDA_GRADIENTS_MATCH_EAGER"
        return f"keep learner.compile refused on CUDA; CUDA_CAUSE = {found['cause']!r}"
    if not holds:
        return f"keep it refused: the fix does not hold under every setting; CUDA_CAUSE = {found['cause']!r}"
    if fix["liger"] is False:
        return "compile only without Liger: refuse learner.compile with liger_kernels on CUDA, allow it without"
    same = fix["env"] == CUDA_FIX.env and fix["clone_inputs"] == CUDA_FIX.clone_inputs
    change = "" if same else f"set CUDA_FIX = CompileFix({fix['env']}, clone_inputs={fix['clone_inputs']}) and "
    return (
        f"{change}flip CUDA_GRADIENTS_MATCH_EAGER to True (cause: {found['cause']}) once tests/gpu's "
        "test_compiled_decoder_layers_match_eager_per_parameter[cuda] says so too (it sets the fix in-process, "
        "after torch is imported, as a learner rank does)"
    )


def print_rows(results: list[dict]) -> None:
    for r in results:
        name = r["variant"]["name"]
        if "error" in r:
            print(f"  {name:40s} ERROR {r['error'][-200:]}")
            continue
        worst = r["worst"][0]["name"] if r["worst"] else "-"
        print(
            f"  {name:40s} {'pass' if r['passed'] else 'FAIL'}  loss diff {r['loss_diff']:.2e}  "
            f"max rel L2 {r['max_rel_l2']:.2e}  worst {worst}  failing kinds {r['failing_kinds'][:3]}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=result_path("gpu_compile_parity"))
    p.add_argument("--shape", default="tiny", help="a benchmarks.gpu.models shape (tiny, qwen2.5-0.5b, ...)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="first-round variants by name (default: all on CUDA, `default` alone on the CPU)",
    )
    p.add_argument(
        "--no-confirm", dest="confirm", action="store_false", help="skip running the fix under other settings"
    )
    p.add_argument("--sequences", type=int, default=None, help="sequences in the batch (CUDA 8, CPU 3)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens per sequence (CUDA 64, CPU 8)")
    p.add_argument(
        "--response", type=int, nargs=2, default=None, help="response lengths drawn from (CUDA 16 256, CPU 2 12)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="variants run at once (CUDA 8 at the tiny shape, 3 at larger ones; CPU 1)",
    )
    p.add_argument("--worker-timeout", type=int, default=300)
    p.add_argument("--cache-dir", default="~/.cache/rlhf_cluster/models")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one variant's JSON: run it in this process
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    for name, on_cuda, on_cpu in (
        ("sequences", 8, 3),
        ("prompt", 64, 8),
        ("response", [16, 256], [2, 12]),
        ("jobs", 8 if args.shape in ("tiny", "demo") else 3, 1),
        ("variants", None, ["default"]),
    ):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from benchmarks.gpu.models import build_model
    from rlhf_cluster.models.liger import liger_available

    cuda = args.device == "cuda"
    model_dir = build_model(args.shape, args.cache_dir)
    liger = cuda and liger_available()
    first = [v for v in candidates(liger) if args.variants is None or v.name in args.variants]
    print(f"compile parity at {args.shape} on {args.device}: {len(first)} variants, {args.jobs} at a time", flush=True)
    results = run_all(first, args, model_dir)
    found = verdict(results)
    confirmed = []
    if found["fix"] is not None and args.confirm:
        confirmed = run_all(confirmations(Variant(**found["fix"]), cuda, liger), args, model_dir)
    holds = bool(confirmed) and all(r.get("passed") for r in confirmed)
    default = next((r for r in results if r["variant"]["name"] == "default" and "error" not in r), {})
    result = {
        "benchmark": "gpu_compile_parity",
        "machine": machine_info(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker", "model_dir", "result")},
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "tolerance": {"fp32_rel_l2": FP32_TOLERANCE, "bf16_factor_over_eager_bf16": BF16_FACTOR},
        "variants": results,
        "confirmations": confirmed,
        **found,
        "verdict": f"cause: {found['cause']}"
        + (f"; the fix holds under {len(confirmed)} other settings: {holds}" if confirmed else ""),
        "fix_holds": holds if confirmed else None,
        "advice": switch_advice(found, holds),
        "headline": headline(
            "learner.compile vs eager, max per-parameter relative L2 error (default variant)",
            default.get("max_rel_l2"),
            f"<= {FP32_TOLERANCE}",
            default.get("passed"),
        ),
    }
    print_rows(results + confirmed)
    print(f"first passing: {found['first_passing']}; {result['verdict']}\nadvice: {result['advice']}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
