"""Direct weight delivery on real parts: FSDP2 / DeepSpeed ranks pack every version into the Ray
object store, vLLM engines in Ray actors verify and load it in place, and the store on disk keeps
only every K-th version. (A damaged bucket is refused: test_weight_reload, on its engine.) The
job's int8 engine then refuses an unquantized push and a damaged int8 variant (test_int8_rollouts'
`check_int8_refusals`)."""

from __future__ import annotations

import json
import urllib.request
from collections import defaultdict

from actors.job import Job
from rlhf_cluster.models.modeling import load_causal_lm
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.weights import WeightStore

# Test modules sit on sys.path by their basename (pytest's default import mode).
from test_int8_rollouts import MAX_ABS_LOGPROB_DIFF, MAX_PROBE_K3, check_int8_refusals

# fp32 engine vs the learner's fp32 forward of the same weights on the probe: measured ~5e-7.
MAX_FP32_DIFF = 1e-4
# The int8 engine's bounds are the int8 probe bounds (tests/integration/test_int8_rollouts.py).
MAX_INT8_DIFF, MAX_INT8_PROBE_K3 = MAX_ABS_LOGPROB_DIFF, MAX_PROBE_K3


def test_direct_job_delivers_every_version_exactly_and_persists_every_kth(ray_cluster, job_config, tiny_model_path,
                                                                         tmp_path):
    # DeepSpeed ranks deliver through the same path: test_learner_backends.test_pipeline_runs_on_deepspeed_ranks.
    steps, every, backend = 5, 3, "fsdp2"
    cfg = job_config(
        name=f"direct-{backend}",
        # One full-precision and one int8 engine: the learner makes both variants of every version.
        generation={"replicas": 2, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8},
                    "probe": {"sequences": 8}, "quantization": ["none", "int8"]},
        learner={"world_size": 2, "lr": 1e-3, "backend": backend},
        train={"total_steps": steps, "prompts_per_step": 4, "max_staleness": 1, "progress": False},
        # Sparse deltas: the full-precision engine gets versions 1, 2 and 4 as the elements changed
        # since the previous one, rebuilds them on its copy and proves the result (0, 3 and 5 go
        # whole: they are written to the store). The int8 engine gets every version whole.
        weights={"transport": {"type": "direct", "bucket_mb": 0.05, "delta": "sparse", "full_every": 100},
                 "persist_every": every, "keep": 100},
        checkpoint={"every_steps": 100},
    )
    job = Job(cfg)
    try:
        result = job.run()
        receipts = job.delivery_receipts
        reports = [json.loads(line) for line in (job.run_dir / "probes.jsonl").read_text().splitlines()]
        stored = WeightStore(cfg.weights_dir).versions()
        # The job's int8 engine, its run over, refuses an unquantized push and a damaged int8 variant
        # (which the store then holds as the version after the job's last).
        check_int8_refusals(job.workers("generation")["gen1"], cfg.weights_dir, tmp_path / "sender",
                            load_causal_lm(tiny_model_path), held=steps)
    finally:
        job.shutdown()
    assert result.final_version == steps
    # The store on disk holds only every K-th version (and the last), all others went by wire only.
    assert stored == [0, 3, 5]

    # Every version reached every engine (pushes are serial and in order), each proven by the
    # fingerprint of the bytes it loaded matching the learner's.
    by_worker = defaultdict(list)
    for receipt in receipts:
        assert receipt.status in ("loaded", "held"), receipt
        by_worker[receipt.worker].append(receipt)
    assert set(by_worker) == {"gen0", "gen1"}
    fingerprints = defaultdict(set)
    for worker, seen in by_worker.items():
        loaded = [r.version for r in seen if r.loaded]
        assert loaded == list(range(steps + 1)), (worker, loaded)  # the driver pushes versions in order
        for r in seen:
            assert r.proven, r
            fingerprints[r.version, r.variant].add(r.fingerprint)
    assert {v for _, v in fingerprints} == {"full", "int8"}
    assert all(len(f) == 1 for f in fingerprints.values()), fingerprints

    # Each engine scores the probe like the learner's forward of that version: exactly (fp32), or
    # within the int8 probe bound, and never exactly (the int8 variant was loaded, not the fp32 one).
    assert {(r["worker"], r["version"]) for r in reports} == {(w, v) for w in by_worker for v in range(steps + 1)}
    for r in reports:
        assert r["variant"] == ("full" if r["worker"] == "gen0" else "int8"), r
        if r["variant"] == "full":
            assert r["max_abs_diff"] < MAX_FP32_DIFF, r
        else:
            assert 1e-5 < r["max_abs_diff"] < MAX_INT8_DIFF and r["k3"] < MAX_INT8_PROBE_K3, r
    # Every load was in place: one engine process per worker served every version.
    assert all(len({r["pid"] for r in reports if r["worker"] == w}) == 1 for w in by_worker), reports
    sizes = {r.variant: r.bytes for r in receipts if r.loaded}
    assert sizes["int8"] < sizes["full"], sizes


def test_every_learner_rank_sends_its_share_of_a_version(ray_cluster, job_config):
    """`senders: every_rank`: with 2 FSDP2 ranks each version not written to the
    store leaves as two shares, one packed and put by each rank; the engine loads the merged
    version, proves it by the fingerprint, and scores the probe exactly like the learner."""
    steps = 3
    cfg = job_config(
        name="direct-shares",
        generation={"replicas": 1, "prompts_per_request": 1, "sampling": {"n": 4, "max_new_tokens": 8},
                    "probe": {"sequences": 8}},
        learner={"world_size": 2, "lr": 1e-3},
        train={"total_steps": steps, "prompts_per_step": 4, "max_staleness": 1, "progress": False},
        weights={"transport": {"type": "direct", "bucket_mb": 0.05, "senders": "every_rank"}, "persist_every": 100,
                 "keep": 100},
        checkpoint={"every_steps": 100},
    )
    job = Job(cfg)
    try:
        job.run()
        receipts = job.delivery_receipts
        reports = [json.loads(line) for line in (job.run_dir / "probes.jsonl").read_text().splitlines()]
        targets = json.loads((job.run_dir / RunDir.SCRAPE_TARGETS).read_text())
        sent = {}
        for group in targets:
            if group["labels"]["pool"] == "learner":
                text = urllib.request.urlopen(f"http://{group['targets'][0]}/metrics", timeout=10).read().decode()
                sent[group["labels"]["worker"]] = sum(
                    float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("rlhf_weights_published_bytes_total{"))
    finally:
        job.shutdown()
    assert [r.version for r in receipts if r.loaded] == list(range(steps + 1)), receipts
    assert all(r.proven for r in receipts), receipts
    assert {r["version"] for r in reports} == set(range(steps + 1))
    assert all(r["max_abs_diff"] < MAX_FP32_DIFF for r in reports), reports  # the whole version, exactly
    # Versions 1 and 2 went as shares (version 0 and the last are written to the store, by rank 0).
    assert sent["rank0"] > 0 and sent["rank1"] > 0, sent
    assert sent["rank1"] < sent["rank0"], sent  # rank 0 also sent versions 0 and 3 whole
