"""`algorithm.shaping.overlong_buffer_fraction`: the DAPO preset's soft overlong punishment covers a
fraction of `generation.sampling.max_new_tokens` (DAPO: 4096 of 20480), not a fixed 4 tokens."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_cluster.config import AlgorithmConfig, ConfigError, load_config
from rlhf_cluster.experience.build import build_group
from rlhf_cluster.job.preflight import preflight
from rlhf_cluster.rewards import overlong_penalty

REPO = Path(__file__).resolve().parents[2]


def test_dapo_preset_buffer_scales_with_max_new_tokens():
    cfg = load_config(None, ["algorithm.preset=dapo", "generation.sampling.max_new_tokens=20480"])
    shaping = cfg.algorithm.shaping
    assert shaping.overlong_buffer == 0 and shaping.overlong_buffer_fraction == 0.2
    assert shaping.overlong_buffer_tokens(20480) == 4096  # DAPO's paper setting
    assert shaping.overlong_buffer_tokens(16) == 3  # 3.2
    assert shaping.overlong_buffer_tokens(8) == 2  # 1.6 (tests/integration/test_presets.py's job)
    assert shaping.overlong_buffer_tokens(4) == 1  # 0.8, rounded half up
    preflight(cfg)


def test_explicit_token_buffer_wins_over_the_fraction():
    cfg = load_config(REPO / "configs" / "dapo.yaml")
    assert cfg.algorithm.shaping.overlong_buffer_fraction == 0.2  # from the preset
    assert cfg.algorithm.shaping.overlong_buffer_tokens(cfg.generation.sampling.max_new_tokens) == 1
    plain = AlgorithmConfig()
    assert plain.shaping.overlong_buffer_tokens(20480) == 0  # off by default


def _group(lengths):
    from rlhf_cluster.experience.records import Rollout

    return [Rollout(f"g0-{i}", "p0", "g0", [1, 2], list(range(3, 3 + n)), [-1.0] * n, 0, "stop")
            for i, n in enumerate(lengths)]


def test_build_group_applies_the_fraction_buffer():
    lengths, max_len = [10, 14, 17, 20], 20
    cfg = AlgorithmConfig(advantage="grpo", kl={"placement": "loss", "coef": 0.0},
                          shaping={"overlong_buffer_fraction": 0.25, "overlong_penalty": 1.0})
    samples, _ = build_group(_group(lengths), [(1.0, {})] * 4, None, cfg, kl_coef=0.0, max_new_tokens=max_len)
    want = overlong_penalty(lengths, max_len, 5, 1.0).tolist()  # 0.25 * 20 = 5 tokens
    assert want[0] == 0.0 and want[2] < 0
    assert [s.reward_components["overlong"] for s in samples] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("sets, tokens", [
    (["algorithm.preset=dapo", "generation.sampling.max_new_tokens=2"], 0),  # 0.4 rounds to 0
    (["algorithm.shaping.overlong_buffer_fraction=0.9", "generation.sampling.max_new_tokens=2"], 2),  # 1.8 -> 2
])
def test_a_fraction_that_rounds_outside_the_response_is_refused(sets, tokens):
    with pytest.raises(ConfigError) as info:
        preflight(load_config(None, sets))
    message = str(info.value)
    assert "algorithm.shaping.overlong_buffer_fraction=" in message
    assert "generation.sampling.max_new_tokens=2" in message and f"buffer of {tokens} tokens" in message


def test_fraction_out_of_range_is_refused_at_load():
    for bad in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match=r"algorithm\.shaping\.overlong_buffer_fraction"):
            load_config(None, [f"algorithm.shaping.overlong_buffer_fraction={bad}"])


def test_dry_run_refuses_in_one_line_with_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "actors.commands.cli", "train", str(REPO / "configs" / "dapo.yaml"), "--dry-run",
         "--set", "algorithm.shaping.overlong_buffer=0", "--set", "generation.sampling.max_new_tokens=2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert "overlong_buffer_fraction=0.2 of generation.sampling.max_new_tokens=2" in out.stderr + out.stdout
