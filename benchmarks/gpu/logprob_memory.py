"""The memory of the log-prob path at a real vocabulary (CPU): forward and backward of the response
tokens' log-probs and entropies from final hidden states (hidden 896, vocabulary 151,936), the
chunked path (`rlhf_cluster.models.chunked_logprobs`) against the full-logits path it replaced,
each in its own process (`python -m benchmarks.gpu.logprob_memory PATH TOKENS`), peak resident
memory above the inputs."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from benchmarks.common import REPO
from benchmarks.gpu.models import VOCAB


def logprob_worker(path: str, tokens: int) -> None:
    """In this process: one forward and backward of `path` (chunked / full); prints the peak resident
    memory above the inputs (sampled every 0.5 ms from /proc/self/statm), in bytes, as JSON."""
    from rlhf_cluster.models.chunked_logprobs import token_logprobs

    torch.manual_seed(0)
    # Made in place: a temporary here would raise the peak the baseline is read from.
    hidden = torch.randn(tokens, 896).requires_grad_()
    weight = torch.randn(VOCAB, 896).mul_(0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,))
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:  # resident bytes now (ru_maxrss is a peak since start: inputs' temporaries included)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if path == "chunked":
        logp, maybe_entropy = token_logprobs(hidden, weight, targets, with_entropy=True)
        assert maybe_entropy is not None  # with_entropy=True
        entropy = maybe_entropy
    else:
        log_p = (hidden @ weight.T).float().log_softmax(-1)
        logp = log_p.gather(1, targets[:, None]).squeeze(1)
        entropy = -(log_p.exp() * log_p).sum(-1)
    (logp.sum() + entropy.sum()).backward()
    done.set()
    sampler.join()
    print(json.dumps({"path": path, "tokens": tokens, "peak_bytes": max(peak[0], rss()) - base}))


def logprob_memory(args: argparse.Namespace) -> list[dict]:
    """Both paths at each of `--logprob-tokens`, each in its own process; the full path's under a
    data limit of `--full-limit-gib` (where it does not fit, its figure is "more than the limit")."""
    rows = []
    for tokens in args.logprob_tokens:
        for path in ("chunked", "full"):
            limit = int(args.full_limit_gib * 2**30) if path == "full" else None
            row = _measure(path, tokens, limit)
            rows.append(row)
            shown = (
                f"{row['peak_bytes'] / 2**30:.2f} GiB"
                if row["fits"]
                else f"> {args.full_limit_gib:.0f} GiB (did not fit)"
            )
            print(f"  log-prob path {path}, {tokens} tokens: {shown}", flush=True)
    return rows


def _measure(path: str, tokens: int, limit: int | None) -> dict:
    """`logprob_worker(path, tokens)` in a process of its own, under a data limit of `limit` bytes."""

    def cap() -> None:
        if limit:
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu.logprob_memory", path, str(tokens)],
        capture_output=True,
        text=True,
        preexec_fn=cap,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    if proc.returncode == 0:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["fits"] = True
        return row
    # Out of memory under the limit: more than the limit.
    return {
        "path": path,
        "tokens": tokens,
        "peak_bytes": limit,
        "fits": False,
        "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200],
    }


if __name__ == "__main__":
    logprob_worker(sys.argv[1], int(sys.argv[2]))
