"""`python -m benchmarks.soak` (`make soak`): the soak's options, its run, its report written."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import benchmarks.soak
from benchmarks.common import RESULTS_DIR
from benchmarks.soak.plan import FAULTS, plan
from benchmarks.soak.pools import format_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=benchmarks.soak.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0, help="decides the fault schedule (replay a run with its seed)")
    ap.add_argument("--faults", type=int, default=40, help="faults planned over the run")
    ap.add_argument("--final-steps", type=int, default=8, help="steps of the last resume, before the evaluation")
    ap.add_argument("--max-gap-s", type=float, default=120.0, help="the longest stretch allowed without a step")
    ap.add_argument(
        "--disk-mb",
        type=int,
        default=4096,
        help="size of the run directory's tmpfs (an hour of the job writes ~0.6 GB)",
    )
    ap.add_argument("--workdir", default="/tmp/rlhf-soak")
    ap.add_argument("--out", default=str(RESULTS_DIR / "soak"))
    ap.add_argument("--spares", type=int, default=1, help="the job's warm generation spares (generation.spares)")
    ap.add_argument(
        "--no-autoscale",
        dest="autoscale",
        action="store_false",
        help="the job without the autoscaler (scaling.auto of its generation and reward pools, benchmarks/soak/job.py)",
    )
    ap.add_argument("--kinds", type=lambda s: s.split(","), help="only these fault kinds (comma-separated)")
    ap.add_argument("--plan-only", action="store_true", help="print the seed's schedule and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan_only:
        for p in plan(args.seed, args.minutes, args.faults, args.kinds or list(FAULTS)):
            print(asdict(p))
        return 0
    # As the CLI does (actors/commands/cli.py): Ray turns token auth on where ~/.ray/auth_token exists, so the
    # cluster started here must too (before ray is imported), or the drivers it serves cannot start actors.
    if (Path.home() / ".ray" / "auth_token").exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from benchmarks.soak.run import Soak

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the cluster and the tmpfs are cleaned up
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        soak.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-seed{args.seed}-{int(args.minutes)}min.json"
    path.write_text(json.dumps(report, indent=1))
    pools = report["pools"]
    shown = {**report, "pools": {k: v for k, v in pools.items() if k != "timeline"}}  # the table below instead
    print(json.dumps({k: v for k, v in shown.items() if k not in ("injected",)}, indent=1))
    print("\n".join(format_table(pools)))
    print(f"report: {path}")
    return 0 if report["all_hold"] else 1


if __name__ == "__main__":
    sys.exit(main())
