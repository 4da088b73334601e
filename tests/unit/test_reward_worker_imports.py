"""A reward worker with rule rewards alone starts without torch: importing torch is most of that
process's start-up (~2.5 CPU-s), paid again by every job and every scale-up of the pool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_rule_reward_scoring_does_not_import_torch():
    code = """
import sys
import actors.workers.scoring
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.rewards import RuleReward
reward = RuleReward("arithmetic")
rollout = Rollout("s0", "p0", "g0", [1, 2], [3], [0.0], 0, "stop", "7", "test")
[(value, parts)] = reward.score([rollout], {"p0": "7"})
assert parts["correct"] == 1.0 and value >= 1.0, (value, parts)
assert "torch" not in sys.modules, "torch was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
