"""Multi-turn episodes on a real vLLM engine: a scripted environment answers each of three model
turns; the sample interleaves model tokens (loss mask 1) and observation tokens (0), and every
model token's rollout log-prob equals an HF forward of the weights that sampled it, including
across a weight version loaded in flight in the middle of the episodes."""

from __future__ import annotations

import time

import ray
import torch
from transformers import AutoTokenizer

from actors.workers.generation import GenerationWorker
from actors.workers.settings import GenerationSettings
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.generation.environments import ScriptedEnvironment
from rlhf_cluster.models.modeling import load_causal_lm, sequence_logprobs
from rlhf_cluster.experience.records import spans_version
from rlhf_cluster.weights import WeightStore

TOLERANCE = 1e-4
TURN = 12  # tokens per model turn (EOS ignored, no stop strings: every turn is full)


def test_three_turn_episodes_mask_observations_and_keep_exact_logprobs_across_a_weight_load(ray_cluster, job_config,
                                                                                           tiny_model_path):
    cfg = job_config(generation={"environment": "scripted", "max_turns": 3, "turn_max_tokens": TURN, "turn_stop": [],
                                 "sampling": {"n": 3, "max_new_tokens": 96, "temperature": 1.0, "ignore_eos": True}})
    store = WeightStore(cfg.weights_dir)
    model = load_causal_lm(tiny_model_path)
    old_state = {k: v.clone() for k, v in model.state_dict().items()}
    store.publish(0, old_state)
    new_state = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in old_state.items()}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    worker = GenerationWorker.remote(GenerationSettings.of(cfg), tiny_model_path, 0)
    try:
        ray.get(worker.sync.remote(0))
        refs = [worker.generate_group.remote(Prompt(f"p{i}", f"{i}+{i}=", str(2 * i)), 0) for i in range(4)]
        deadline = time.monotonic() + 120
        while ray.get(worker.engine_stats.remote())["steps"] < 10:  # the episodes are under way
            assert time.monotonic() < deadline, "no engine steps"
            time.sleep(0.01)
        store.publish(1, new_state)
        assert ray.get(worker.sync.remote(1)) == 1
        rollouts = [r for rs in ray.get(refs) for r in rs]
    finally:
        ray.kill(worker)

    old_model = load_causal_lm(tiny_model_path)
    model.load_state_dict(new_state)
    observations = [tokenizer(ScriptedEnvironment.observation(k), add_special_tokens=False)["input_ids"] for k in (1, 2)]
    crossed = 0
    assert len(rollouts) == 12
    for r in rollouts:
        # Turn, observation 1, turn, observation 2, turn: the environment ended it after the third turn.
        expected_mask = [1] * TURN + [0] * len(observations[0]) + [1] * TURN + [0] * len(observations[1]) + [1] * TURN
        assert r.loss_mask == expected_mask, r.loss_mask
        assert r.turn_rewards == [0.1, 0.2, 0.3]  # the environment's reward for each model turn
        assert r.turn_starts == [0, TURN + len(observations[0]), 2 * TURN + len(observations[0]) + len(observations[1])]
        first_obs = r.response_ids[TURN:TURN + len(observations[0])]
        assert first_obs == observations[0]
        assert r.response_ids[2 * TURN + len(observations[0]):][:len(observations[1])] == observations[1]
        assert all(lp == 0.0 for lp, m in zip(r.rollout_logprobs, r.loss_mask) if not m)
        # Every model token: the log-prob of the weights that sampled it, over the whole context.
        got = torch.tensor(r.rollout_logprobs)
        by_version = {0: sequence_logprobs(old_model, r.prompt_ids, r.response_ids),
                      1: sequence_logprobs(model, r.prompt_ids, r.response_ids)}
        for t, m in enumerate(r.loss_mask):
            if m:
                assert abs(got[t] - by_version[spans_version(r.policy_versions, t)][t]) < TOLERANCE, (t, r.policy_versions)
        crossed += len({v for _, v in r.policy_versions}) > 1
    assert crossed > 0, "no episode spanned the weight load"
    # The two versions really differ on these tokens, so the check above could fail.
    r = rollouts[0]
    assert (sequence_logprobs(old_model, r.prompt_ids, r.response_ids)
            - sequence_logprobs(model, r.prompt_ids, r.response_ids)).abs().max() > 100 * TOLERANCE

