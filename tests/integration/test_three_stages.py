"""The human-feedback half on real parts: SFT and a reward model trained on FSDP2 ranks in Ray,
the reward model served frozen (also on int8 weights) by the scoring pool, and RL steps against it."""

from __future__ import annotations

import pytest
import ray
import torch

from actors.job import Job
from actors.commands.supervised import run_stage
from rlhf_cluster.config import RewardModelSpec
from rlhf_cluster.data.chat_template import STAND_IN_CHAT_TEMPLATE
from rlhf_cluster.data.preferences import arithmetic_preference_pairs
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.reference import ReferenceModel
from rlhf_cluster.scoring.reward_model import FrozenRewardModels


# The reward model's held-out pairwise accuracy: 120 pairs (30 sums never trained on, 4 wrong
# answers each); chance is 0.5. Training is seeded and bit-identical run to run on one machine, but
# another CPU's kernels round differently and the run follows another trajectory, so the spread over
# seeds and kernel sets is the noise that matters. The recipe of configs/three_stage.yaml (4 layers,
# SFT 400 cosine steps, RM cosine + LM regularisation; docs/algorithms.md, issue 39), measured by
# benchmarks/reward_model_spread.py at seeds 0-4: AVX2 kernels 0.858-0.958; scalar kernels
# 0.867-0.942; and one-rank trajectories of seeds 0-7 (benchmarks/_rm_recipe_sweep.py) 0.767-0.967.
# (The recipe before: 0.558 at seed 0 on AVX2, 0.825 on AVX-512.) 0.7 sits below the worst of them
# all and 4 standard deviations (0.046 each) above chance.
MIN_PAIRWISE_ACCURACY = 0.7
# The bounds below were set on 24 (SFT, RM) pairs trained by the recipe before issue 39 (stage
# seeds 0-11 at lr 3e-4, 0-5 at lr 1e-3 for 600 and 1200 steps); the recipe now, seed 0 on AVX2:
# served accuracy 1.000, int8 preference agreement 1.000, score error / std 0.005, reference
# |d logprob| mean 0.0048, max 0.077. Scored on the 64 training pairs below:
# - accuracy of the served (full-precision) reward model: worst 0.906, median 0.984;
MIN_TRAIN_PAIR_ACCURACY = 0.85
# - int8 vs full reward model: preference agreement worst 0.969 (one or two of 64 pairs flip when
#   their scores are nearly tied); mean |score difference| / score std worst 0.020 (its max over
#   the 128 sequences reached 0.51, so the max is not bounded);
MIN_INT8_PREFERENCE_AGREEMENT = 0.9
MAX_INT8_MEAN_SCORE_ERROR_OVER_STD = 0.05
# - int8 vs full reference (SFT) model: mean |logprob difference| worst 0.011 (DESIGN.md: 0.01-0.02
#   on a 156M model), max over tokens worst 0.196.
MAX_INT8_MEAN_REF_ERROR = 0.03
MAX_INT8_REF_ERROR = 0.4
TRAIN_PAIRS = 64


def _train_stages(tmp_path_factory, model_cache, overrides: list[str]):
    from rlhf_cluster.config import load_config
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    run_dir = tmp_path_factory.mktemp("three_stage")
    cfg = load_config("configs/three_stage.yaml", [
        f"run_dir={run_dir}", f"model.cache_dir={model_cache}", "train.progress=false",
        "train.total_steps=4", "train.prompts_per_step=4",
        "generation.sampling.n=4", "checkpoint.every_steps=100", *overrides,
    ])
    base = str(ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
    sft = run_stage(cfg, "sft", base, progress=False)
    rm = run_stage(cfg, "reward_model", sft["output"], progress=False)
    return cfg, sft, rm


@pytest.fixture(scope="module")
def stages(ray_cluster, tmp_path_factory, model_cache):
    """configs/three_stage.yaml's recipe in full (1,000 supervised steps on two ranks)."""
    return _train_stages(tmp_path_factory, model_cache, [])


@pytest.fixture(scope="module")
def short_stages(ray_cluster, tmp_path_factory, model_cache):
    """The same stages, 12 steps each: the hand-overs on real parts, not what the steps learn."""
    return _train_stages(tmp_path_factory, model_cache, [
        "sft.steps=12", "sft.lr_warmup_steps=2", "reward_model.steps=12", "reward_model.lr_warmup_steps=2",
        "train.total_steps=2"])


def test_short_stages_train_on_fsdp2_ranks_and_rl_runs_against_the_reward_model(short_stages):
    # `make test`'s check of the three stages; the slow tests below check what they learn.
    cfg, sft, rm = short_stages
    assert cfg.sft.world_size == cfg.reward_model.world_size == 2
    assert sft["final_loss"] < sft["first_loss"], sft
    assert rm["eval_examples"] == 120 and 0.0 <= rm["eval_pairwise_accuracy"] <= 1.0, rm
    _served_scores_then_rl(cfg, sft, rm)


@pytest.mark.learning
@pytest.mark.slow
def test_sft_and_reward_model_train_on_fsdp2_ranks(stages):
    cfg, sft, rm = stages
    assert cfg.sft.world_size == cfg.reward_model.world_size == 2
    assert sft["final_loss"] < 0.5 * sft["first_loss"], sft
    assert rm["eval_examples"] == 120
    print(f"reward model: held-out pairwise accuracy {rm['eval_pairwise_accuracy']:.3f}, reward gap {rm['eval_reward_gap']:.3f}")
    assert rm["eval_pairwise_accuracy"] >= MIN_PAIRWISE_ACCURACY, rm
    assert rm["final_loss"] < rm["first_loss"], rm
    assert -1.0 <= rm["eval_length_correlation"] <= 1.0


@pytest.mark.slow
def test_rl_runs_against_the_frozen_reward_model(stages):
    cfg, sft, rm = stages
    served = _served_scores_then_rl(cfg, sft, rm)
    n = TRAIN_PAIRS
    accuracy = sum(c > r for c, r in zip(served[:n], served[n:])) / n
    print(f"served reward model: pairwise accuracy {accuracy:.3f} on {n} training pairs")
    assert accuracy >= MIN_TRAIN_PAIR_ACCURACY, f"the served reward model prefers the correct sum on {accuracy:.3f} of pairs"


def _with_reward_model(cfg, sft, rm):
    model = cfg.model.model_copy(update={"path": sft["output"]})
    scoring = cfg.scoring.with_reward_models([RewardModelSpec(path=rm["output"], name="rm")])
    return cfg.model_copy(update={"model": model, "scoring": scoring})


def _served_scores_then_rl(cfg, sft, rm) -> list[float]:
    """A job from the SFT model, rewarded by the reward model alone. Before it trains, its scoring
    pool must serve the reward model frozen: with rule_weight 0 the reward is its score (the same
    as scoring in this process), and the verifier's verdict is recorded beside it. Then RL steps
    run. Returns the served scores of the training pairs' chosen responses, then their rejected
    ones."""
    from transformers import AutoTokenizer

    rl = _with_reward_model(cfg, sft, rm)
    tokenizer = AutoTokenizer.from_pretrained(sft["output"])
    assert tokenizer.chat_template == STAND_IN_CHAT_TEMPLATE  # the format it was fine-tuned on went with it
    rollouts, answers = _train_pair_rollouts(cfg, tokenizer)
    with Job(rl) as job:
        worker = next(iter(job.workers("reward").values()))
        scored = ray.get(worker.score.remote(rollouts, answers))
        result = job.run()
    served = [reward for reward, _ in scored]
    assert all(reward == parts["rm"] == parts["rm/rm"] for reward, parts in scored)
    assert rl.scoring.model_source is not None
    local = FrozenRewardModels(rl.scoring.model_source.models).score(rollouts)["rm"]
    assert served == pytest.approx(local, abs=1e-4)
    assert [parts["correct"] for _, parts in scored] == [1.0] * TRAIN_PAIRS + [0.0] * TRAIN_PAIRS
    assert result.final_version == rl.train.total_steps
    assert [r["weight_version"] for r in result.rows] == list(range(1, rl.train.total_steps + 1))
    assert result.accuracy_before is not None and result.accuracy_after is not None
    return served


def _rollouts(tokenizer, pairs):
    out = []
    for i, (prompt, answer) in enumerate(pairs):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Rollout(f"s{i}", f"p{i}", f"g{i}", p, r, [0.0] * len(r), 0, "stop", answer, "test"))
    return out


def _train_pair_rollouts(cfg, tokenizer):
    """The first TRAIN_PAIRS preference pairs the reward model trained on, as rollouts: the chosen
    (correct) responses first, then the rejected ones; and each rollout's reference answer."""
    pairs = arithmetic_preference_pairs(TRAIN_PAIRS, cfg.data.seed, "train", cfg.data.max_operand)
    rollouts = _rollouts(tokenizer, [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs])
    return rollouts, {r.prompt_id: pairs[i % TRAIN_PAIRS].chosen for i, r in enumerate(rollouts)}


@pytest.mark.slow
def test_int8_frozen_scoring_error_is_small(stages):
    from transformers import AutoTokenizer

    cfg, sft, rm = stages
    tokenizer = AutoTokenizer.from_pretrained(sft["output"])
    rollouts, _ = _train_pair_rollouts(cfg, tokenizer)
    spec = [RewardModelSpec(path=rm["output"], name="rm")]
    full, int8 = FrozenRewardModels(spec), FrozenRewardModels(spec, quantization="int8")
    s_full, s_int8 = torch.tensor(full.score(rollouts)["rm"]), torch.tensor(int8.score(rollouts)["rm"])
    ref_full = ReferenceModel(sft["output"]).logprobs(rollouts)
    ref_int8 = ReferenceModel(sft["output"], quantization="int8").logprobs(rollouts)
    ref_err = torch.tensor([abs(a - b) for x, y in zip(ref_full, ref_int8) for a, b in zip(x, y)])
    score_err = float((s_full - s_int8).abs().mean() / s_full.std())
    n = TRAIN_PAIRS
    agreement = float(((s_full[:n] > s_full[n:]) == (s_int8[:n] > s_int8[n:])).float().mean())
    print(f"int8 frozen scoring: |d ref logprob| mean {float(ref_err.mean()):.4f} max {float(ref_err.max()):.4f}; "
          f"mean |d RM score| / std {score_err:.4f}; preference agreement {agreement:.3f}")
    assert 0 < float(ref_err.mean()) < MAX_INT8_MEAN_REF_ERROR and float(ref_err.max()) < MAX_INT8_REF_ERROR
    assert 0 < score_err < MAX_INT8_MEAN_SCORE_ERROR_OVER_STD
    # The preferences the reward model gives are what RL uses: int8 keeps them.
    assert agreement >= MIN_INT8_PREFERENCE_AGREEMENT
