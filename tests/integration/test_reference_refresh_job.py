"""Reference refresh in a real job (`algorithm.kl.reference_refresh`): after every step the KL
reference moves half way to the policy's new version; each refresh is a folder in the run
directory, the mix of the version the store holds and the reference before it; the reference
worker holds the newest at the job's end (its own /metrics says so); every scored sample's
reference log-probs are those of one of the references; and a resumed job's reference worker
starts from its checkpoint's reference, then refreshes on."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import safetensors.torch
import torch

from actors.job import Job
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.run.scored_log import ScoredLog
from rlhf_cluster.scoring.reference import ReferenceModel
from rlhf_cluster.weights.reference_refresh import folder_of
from rlhf_cluster.weights.store import WeightStore

MIX = 0.5


def _scraped_reference_version(job: Job) -> float:
    address = job.worker_infos("reference")["ref0"]["metrics"]
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("rlhf_reference_weight_version{")]  # fmt: skip
    assert len(values) == 1, values
    return values[0]


def test_the_reference_moves_with_the_policy_and_a_resume_keeps_it(ray_cluster, job_config, tiny_model_path):
    def config(steps):
        return job_config(
            name="refresh", reference=True,
            algorithm={"kl": {"coef": 0.05, "reference_refresh": {"every_steps": 1, "mix": MIX}}},
            train={"total_steps": steps, "prompts_per_step": 2, "max_staleness": 1, "progress": False,
                   "record_rollouts": True},
            weights={"keep": 10}, checkpoint={"every_steps": 1, "keep": 5},  # every refresh kept for a rollback
        )  # fmt: skip

    cfg = config(3)
    with Job(cfg) as job:
        result = job.run()
        assert _scraped_reference_version(job) == 3  # the last step's refresh is in before the job ends
    run_dir = Path(cfg.run_dir)
    events = RunDir(run_dir, cfg.weights_dir, cfg.checkpoint_dir)
    assert [e["version"] for e in events.read(RunDir.EVENTS) if e["event"] == "reference_refreshed"] == [1, 2, 3]
    seen = [r["reference_version"] for r in result.rows]
    assert seen[0] == 0 and seen == sorted(seen) and all(v <= r["step"] for v, r in zip(seen, result.rows))
    # Each refresh is the stored version mixed half way with the reference before it.
    store, root = WeightStore(cfg.weights_dir), run_dir / RunDir.REFERENCE
    folders = [Path(tiny_model_path), *(folder_of(root, v) for v in (1, 2, 3))]
    for v in (1, 2, 3):
        stored = store.load(v)
        before = safetensors.torch.load_file(str(folders[v - 1] / "model.safetensors"))
        after = safetensors.torch.load_file(str(folders[v] / "model.safetensors"))
        for name, tensor in stored.items():
            expected = MIX * tensor.float() + (1 - MIX) * before[name].float()  # kept in float32
            assert after[name].dtype == torch.float32 and (after[name] - expected).abs().max() <= 1e-6, (v, name)
    # Every scored sample's reference log-probs are one reference's (whichever held the pool then).
    samples = [s for _, group in ScoredLog(run_dir / RunDir.SCORED_LOG).since(0) for s in group]
    rollouts = [Rollout(sample_id=s.sample_id, prompt_id=s.prompt_id, group_id=s.group_id, prompt_ids=s.prompt_ids,
                        response_ids=s.response_ids, rollout_logprobs=s.rollout_logprobs,
                        policy_version=s.policy_version, finish_reason=s.finish_reason) for s in samples]  # fmt: skip
    scored = [ReferenceModel(str(folder)).logprobs(rollouts) for folder in folders]
    used = set()
    for i, s in enumerate(samples):
        matches = [k for k, by in enumerate(scored) if s.ref_logprobs == pytest.approx(by[i], abs=1e-4)]
        assert matches, f"sample {s.sample_id}: its reference log-probs are no reference's"
        used.add(matches[0])
    assert 0 in used  # the first steps' samples: the starting model's

    # Resumed for a fourth step: its reference starts as the checkpoint's (version 3), then refreshes to 4.
    with Job(config(4), resume="auto") as job:
        assert _scraped_reference_version(job) == 3
        resumed = job.run()
        assert _scraped_reference_version(job) == 4
    assert [r["reference_version"] for r in resumed.rows] == [3]
    assert [e["version"] for e in events.read(RunDir.EVENTS) if e["event"] == "reference_refreshed"] == [1, 2, 3, 4]
