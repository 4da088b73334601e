"""The soak's reward function (`benchmarks.soak.reward:arithmetic` in its job): the arithmetic
verifier, unless the file named by $SOAK_REWARD_MODE says `fail` (every call raises) or `hang`
(every call sleeps past the job's `timeout_s`); the soak writes that file to make the reward
function fail for a while."""

from __future__ import annotations

import os
import time

from rlhf_cluster.data.tasks import verify_arithmetic


def _mode() -> str:
    path = os.environ.get("SOAK_REWARD_MODE")
    try:
        return open(path).read().strip() if path else "ok"
    except OSError:
        return "ok"


def arithmetic(response: str, answer: str) -> dict[str, float]:
    mode = _mode()
    if mode == "fail":
        raise RuntimeError("soak: the reward function is failing (injected)")
    if mode == "hang":
        time.sleep(30)
    return verify_arithmetic(response, answer)
