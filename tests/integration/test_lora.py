"""LoRA on the policy: only adapters train, the base model (adapters off) is the reference, and
generation engines receive the adapters alone and sample as the merged model. Real Ray, FSDP2
(gloo), vLLM (LoRA adapters on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import ray
import torch

from actors.job import Job
from rlhf_cluster.generation.probe import PROBE_FILE, parse_probe_file
from rlhf_cluster.models.lora import PEFT_PREFIX, adapter_names, is_adapter_param
from rlhf_cluster.models.modeling import load_causal_lm, sequence_logprobs
from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.weights import WeightStore

from test_learner_ranks import _group, _samples

RANK, ALPHA = 4, 8.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_lora_trains_adapters_only_and_references_the_base_model(ray_cluster, job_config, tiny_model_path, tmp_path):
    cfg = job_config(learner={"world_size": 2, "lr": 1e-2, "lora": {"rank": RANK, "alpha": ALPHA}},
                     algorithm={"kl": {"placement": "loss", "coef": 0.1}})
    samples = _samples()
    shards = [samples[0::2], samples[1::2]]
    batches = [TrainBatch.from_samples(s) for s in shards]
    base = load_causal_lm(tiny_model_path)
    base_state = base.state_dict()
    ranks = _group(cfg, tiny_model_path, 2)
    try:
        def reference():
            return [r for rs in ray.get([k.reference_logprobs.remote(b) for k, b in zip(ranks, batches)]) for r in rs]

        def base_logprobs():
            return [sequence_logprobs(base, s.prompt_ids, s.response_ids).tolist() for shard in shards for s in shard]

        # Version 0 is the base model exactly (LoRA's B starts at zero).
        before = ray.get([k.full_state_dict.remote() for k in ranks])[0]
        assert set(before) == set(base_state) and all(torch.equal(before[k], v) for k, v in base_state.items())

        stats = [m for m, _ in ray.get([k.train.remote(b, 1, 0.1) for k, b in zip(ranks, batches)])]
        assert stats[0]["learner/skipped_updates"] == 0.0
        after = ray.get([k.full_state_dict.remote() for k in ranks])[0]
        changed = {k for k, v in base_state.items() if not torch.equal(after[k], v)}
        # Only the adapted layers moved, each by a matrix of rank <= r (B A): the base stayed frozen.
        assert changed and all(k.endswith(".weight") and any(f".{t}." in k for t in TARGETS) for k in changed)
        for k in changed:
            assert torch.linalg.matrix_rank(after[k] - base_state[k]).item() <= RANK

        # The reference log-probs are the base model's, before and after the adapters changed...
        for got, want in zip(reference(), base_logprobs()):
            assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5
        # ...while the policy (adapters on) has moved away from them.
        policy = ray.get([k.probe_logprobs.remote([s.prompt_ids for s in sh], [s.response_ids for s in sh])
                          for k, sh in zip(ranks, shards)])[0]
        moved = max(abs(a - b) for got, want in zip(policy, base_logprobs()[: len(policy)]) for a, b in zip(got, want))
        assert moved > 1e-3

        # Checkpoints hold the adapters (and their optimizer state) only.
        ckpt = tmp_path / "ckpt"
        (ckpt / "rng").mkdir(parents=True)
        ray.get([k.save_checkpoint.remote(str(ckpt)) for k in ranks])
        ray.get([k.wait_checkpoint.remote() for k in ranks])
        import torch.distributed.checkpoint as dcp

        keys = dcp.FileSystemReader(str(ckpt / "learner")).read_metadata().state_dict_metadata
        model_keys = [k for k in keys if k.startswith("model.")]
        assert model_keys and all(is_adapter_param(k) for k in model_keys)
    finally:
        for rank in ranks:
            ray.kill(rank)


def test_lora_job_sends_adapters_only_and_engines_sample_as_the_merged_model(ray_cluster, job_config,
                                                                           tiny_model_path):
    steps = 3
    cfg = job_config(learner={"world_size": 1, "lr": 1e-2, "lora": {"rank": RANK, "alpha": ALPHA}},
                     train={"total_steps": steps, "prompts_per_step": 4, "max_staleness": 1, "progress": False},
                     weights={"persist_every": 1})
    assert cfg.learner.lora.sync == "adapters"  # the default
    job = Job(cfg)
    try:
        assert "reference" not in job.pool_sizes()  # the learner's base model is the reference
        result = job.run()
        receipts = job.delivery_receipts
    finally:
        job.shutdown()
    assert [r["weight_version"] for r in result.rows] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["kl"])) for r in result.rows)

    # Each version is the adapters alone: A (r x in) and B (out x r) of every adapted layer.
    base = load_causal_lm(tiny_model_path)
    base_state = {k: v.clone() for k, v in base.state_dict().items() if k != "lm_head.weight"}  # tied: sent once
    store = WeightStore(cfg.weights_dir)
    final = store.load(steps)
    assert final and all(is_adapter_param(k) for k in final)
    assert set(final) == adapter_names(base_state, cfg.learner.lora)
    adapter_bytes = sum(t.numel() * t.element_size() for t in final.values())
    merged_bytes = sum(t.numel() * t.element_size() for t in base_state.values())
    loaded = [r for r in receipts if r.loaded]
    assert {r.version for r in loaded} == set(range(steps + 1))
    assert all(r.proven for r in loaded)
    # What one sync moves (the delivery's buckets) is the adapters' bytes, far below the merged model's.
    moved = max(r.bytes for r in loaded)
    assert adapter_bytes <= moved < adapter_bytes + 4096 * len(final), (moved, adapter_bytes)
    print(f"bytes per sync: adapters {moved} vs merged {merged_bytes} ({moved / merged_bytes:.3f})")
    assert moved / merged_bytes < 0.1

    # The engine served the updated adapters: its log-probs of the probe equal the learner's
    # (adapters on) to fp32 precision, every version...
    probes = [json.loads(x) for x in (Path(result.run_dir) / "probes.jsonl").read_text().splitlines()]
    assert {p["version"] for p in probes} == set(range(steps + 1))
    assert max(p["max_abs_diff"] for p in probes) < 1e-4
    # ...and the learner's are those of the merged model, W + alpha/r B A, built here from the
    # version's adapters: the engine samples as the merged model would.
    probe, learner_logprobs = parse_probe_file(store.read_file(steps, PROBE_FILE))
    merged = dict(base_state)
    for name, a in final.items():
        if name.endswith(".lora_A.weight"):
            layer = name.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = final[name.replace(".lora_A.", ".lora_B.")]
            merged[f"{layer}.weight"] = base_state[f"{layer}.weight"] + (ALPHA / RANK) * (b.float() @ a.float())
    base.load_state_dict(merged, strict=False)
    assert any(not torch.equal(merged[k], v) for k, v in base_state.items())
    for prompt, response, want in zip(probe.prompt_ids, probe.response_ids, learner_logprobs):
        got = sequence_logprobs(base, prompt, response).tolist()
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
