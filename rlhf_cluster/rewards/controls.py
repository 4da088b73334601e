"""Control rewards for experiments: rewards that carry no learning signal on purpose, and one
that carries a signal any model can learn in a few steps.

`placebo_arithmetic` trains on a uniform random reward while still recording whether the answer
is correct (the `correct` component, which held-out evaluation reads). A run with it moves the
weights as much as real RL does, but in no useful direction: the spread of its held-out
accuracy change across seeds is the noise a real improvement has to beat (see
tests/integration/test_demo_learns.py).

The draws are reproducible: a run repeated at the same job seed samples the same responses and
so gets the same rewards, whatever order the reward workers' threads score them in. The k-th
scoring of a (response, answer) pair in a process draws from a hash of the pair and k, so a
response written again gets a fresh draw (no string is consistently rewarded, which would be a
signal), and which of several identical responses gets which draw does not change the update.

`digit_share` is the positive control: the share of digits in the response. A random tiny model
writes few digits and can write many without learning anything about the task, so RL at a high
learning rate raises it within a few steps (tests/integration/test_learns_a_strong_signal.py;
its spread over seeds and CPU kernels: benchmarks/strong_signal_spread.py).
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter

from rlhf_cluster.data.tasks import verify_arithmetic
from rlhf_cluster.data.tool_task import verify_tool_arithmetic


class PlaceboDraws:
    """Uniform draws in [0, 1) keyed by what is scored and how often it was scored before."""

    def __init__(self, salt: str = "rlhf_cluster.placebo"):
        self.salt = salt.encode()
        self._seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()  # reward workers score in threads

    def draw(self, response: str, answer: str) -> float:
        with self._lock:
            occurrence = self._seen[response, answer]
            self._seen[response, answer] += 1
        scored = f"{occurrence}\x00{answer}\x00{response}".encode()
        return int.from_bytes(hashlib.blake2b(scored, key=self.salt, digest_size=8).digest(), "little") / 2**64


_DRAWS = PlaceboDraws()


def placebo_arithmetic(response: str, answer: str) -> dict[str, float]:
    """`data.reward_fn: rlhf_cluster.rewards.controls:placebo_arithmetic`."""
    return {"reward": _DRAWS.draw(response, answer), "correct": verify_arithmetic(response, answer)["correct"]}


def placebo_tool_arithmetic(response: str, answer: str) -> dict[str, float]:
    """The placebo of the tool task (`configs/tool_demo.yaml`): correctness judged on the final turn."""
    return {"reward": _DRAWS.draw(response, answer), "correct": verify_tool_arithmetic(response, answer)["correct"]}


def digit_share(response: str, answer: str) -> float:
    """The share of the response's characters that are digits (0 for an empty response)."""
    return sum(c.isdigit() for c in response) / len(response) if response else 0.0
