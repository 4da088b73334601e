"""Control rewards for experiments: rewards that carry no learning signal on purpose.

`placebo_arithmetic` trains on a uniform random reward while still recording whether the answer
is correct (the `correct` component, which held-out evaluation reads). A run with it moves the
weights as much as real RL does, but in no useful direction: the spread of its held-out
accuracy change across seeds is the noise a real improvement has to beat (see
tests/integration/test_demo_learns.py).
"""

from __future__ import annotations

import random

from rlhf_cluster.data.tasks import verify_arithmetic
from rlhf_cluster.data.tool_task import verify_tool_arithmetic


def placebo_arithmetic(response: str, answer: str) -> dict[str, float]:
    """`data.reward_fn: rlhf_cluster.rewards.controls:placebo_arithmetic`."""
    return {"reward": random.random(), "correct": verify_arithmetic(response, answer)["correct"]}


def placebo_tool_arithmetic(response: str, answer: str) -> dict[str, float]:
    """The placebo of the tool task (`configs/tool_demo.yaml`): correctness judged on the final turn."""
    return {"reward": random.random(), "correct": verify_tool_arithmetic(response, answer)["correct"]}
