"""LLM-as-judge rewards on real parts: a judge model served by its own pool's vLLM engine, its
prompt rendered around each sample, its reply parsed into the reward. The judges are the tiny
model with weights set so that greedy decoding answers one token whatever it reads: "7" (a
`score_0_10` judge that always says 0.7), or the padding token (a reply no parser reads). Whether a
trained judge's rewards teach the policy is `benchmarks/judge.py`'s (docs/demo-results.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.job import Job, run_job
from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog
from tests.integration.scaling_operator import run_while_scaling


def one_token_judge(model_cache: str, out: Path, token: str | None) -> str:
    """The tiny model answering `token` (None: token id 0, the padding) to any prompt: its residual
    stream is one vector at every position (equal embeddings, attention and MLP outputs zeroed),
    and only that token's output row points along it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = ensure_tiny_model(TinyModelConfig(), model_cache)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    target = 0 if token is None else tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        e = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        model.model.embed_tokens.weight[:] = e
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[target] = 10 * e / e.norm()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return str(out)


def _samples(cfg) -> list:
    return [s for _, group in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0) for s in group]


def test_a_judges_verdict_is_the_reward_beside_a_verifier_recorded_at_weight_0(
    ray_cluster, job_config, model_cache, tmp_path
):
    judge = one_token_judge(model_cache, tmp_path / "judge7", "7")
    cfg = job_config(
        name="judged",
        scoring={"rewards": [
            {"type": "verifier", "weight": 0.0},
            {"type": "judge", "model": judge, "name": "seven", "template": "score", "verdict": "score_0_10",
             "max_tokens": 1, "weight": 2.0},
        ]},
        train={"total_steps": 2, "prompts_per_step": 2, "max_staleness": 1, "progress": False, "record_rollouts": True},
    )
    result = run_job(cfg)
    assert [r["step"] for r in result.rows] == [0, 1]
    samples = _samples(cfg)
    assert samples
    for s in samples:
        assert s.reward_components["judge/seven"] == pytest.approx(0.7)
        assert s.reward == pytest.approx(2.0 * 0.7)  # the verifier's weight is 0: recorded, not rewarded
        assert 0.0 <= s.reward_components["rule"] <= 1.0  # the verifier's own (graded) value


def test_a_group_judge_picks_one_response_of_each_group(ray_cluster, job_config, model_cache, tmp_path):
    """`group: true, verdict: choice`: one prompt per group listing its responses; the judge here
    always answers "1", so each group's first response gets 1 and the others 0. The judge runs on
    int8 weights (a W8A8 copy written into the run directory)."""
    judge = one_token_judge(model_cache, tmp_path / "judge1", "1")
    cfg = job_config(
        name="group-judge",
        scoring={"rewards": [{"type": "judge", "model": judge, "template": "best_of_group", "verdict": "choice",
                              "group": True, "max_tokens": 1, "quantization": "int8"}]},
        train={"total_steps": 2, "prompts_per_step": 2, "max_staleness": 1, "progress": False, "record_rollouts": True},
    )
    run_job(cfg)
    assert "quantization_config" in (Path(cfg.run_dir) / RunDir.JUDGE_INT8 / "config.json").read_text()
    groups = [group for _, group in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0)]
    assert groups
    for group in groups:
        assert sorted(s.reward_components["judge/judge"] for s in group) == [0.0] * (len(group) - 1) + [1.0]


def test_a_judge_whose_replies_hold_no_verdict_stops_the_job_naming_it(ray_cluster, job_config, model_cache, tmp_path):
    judge = one_token_judge(model_cache, tmp_path / "mute", None)
    cfg = job_config(
        name="mute-judge",
        scoring={"rewards": [{"type": "judge", "model": judge, "name": "mute", "max_tokens": 1}]},
        train={"total_steps": 2, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
    )
    with pytest.raises(Exception, match=r"judge 'mute' \(scoring.rewards\) failed on 32 samples in a row") as caught:
        run_job(cfg)
    assert "no yes_no verdict in the reply" in str(caught.value)


# `slow`: every pool is resized by the same code since the pools come from one table (issue 68):
# tests/integration/test_scaling.py resizes a running job's pool, tests/unit/test_pool_table.py
# checks the judge's row; `make test-slow` runs it here too.
@pytest.mark.slow
def test_the_judge_pool_scales_like_the_others(ray_cluster, job_config, model_cache, tmp_path):
    """`rlhf-cluster scale --pool judge` (its controller call): up to 2 workers and back to 1 while
    the job runs; both sizes judge samples, and the scrape targets follow."""
    judge = one_token_judge(model_cache, tmp_path / "judge7", "7")
    cfg = job_config(
        name="judge-scaling",
        scoring={"rewards": [{"type": "judge", "model": judge, "template": "score", "verdict": "score_0_10",
                              "max_tokens": 1}]},
        train={"total_steps": 100_000, "prompts_per_step": 2, "max_staleness": 1, "progress": False,
               "record_rollouts": True},
    )
    _, seen = run_while_scaling(Job(cfg), "judge-scaling", "judge", steps_up=3, steps_down=2)
    assert seen["up"]["sizes"]["judge"] == 2 and seen["up"]["changed"] == ["judge1"]
    assert seen["targets_up"] == {"judge0", "judge1"}
    assert seen["down"]["sizes"]["judge"] == 1 and seen["targets_down"] == {"judge0"}
    samples = _samples(cfg)
    assert samples and all(s.reward_components["judge/judge"] == pytest.approx(0.7) for s in samples)
