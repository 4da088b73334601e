"""The FSDP2 and DeepSpeed learners and reference scoring on CUDA (NCCL, world size 1): run on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.config import JobConfig
from rlhf_cluster.learner.base import LearnerSpec
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.models.modeling import load_causal_lm, response_logprobs
from rlhf_cluster.experience.records import ScoredSample, TrainBatch
from tests.process_groups import one_rank_process_group


@pytest.fixture
def nccl_group():
    torch.cuda.set_device(0)
    with one_rank_process_group("nccl"):
        yield


def _batch(n=4, length=6):
    g = torch.Generator().manual_seed(0)
    samples = [
        ScoredSample(
            sample_id=f"s{i}", prompt_id="p", group_id="g", prompt_ids=torch.randint(2, 250, (5,), generator=g).tolist(),
            response_ids=torch.randint(2, 250, (length,), generator=g).tolist(), rollout_logprobs=[-5.5] * length,
            policy_version=0, finish_reason="length", reward=float(i), reward_components={},
            ref_logprobs=[-5.5] * length, advantages=[float(i) - 1.5] * length,
        )
        for i in range(n)
    ]
    return TrainBatch.from_samples(samples)


def test_fsdp2_step_on_cuda_matches_cpu_logprobs(nccl_group, tiny_model_path):
    cfg = JobConfig.model_validate({"learner": {"world_size": 1}})
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
    assert next(learner.model.parameters()).is_cuda
    batch = _batch()

    cpu_model = load_causal_lm(tiny_model_path)
    with torch.no_grad():
        cpu_logp, _ = response_logprobs(cpu_model, batch.input_ids, batch.attention_mask, batch.prompt_lengths, 6)
        gpu_logp, _ = learner._logprobs(learner._to_device(batch), slice(None), with_entropy=False)
    assert (gpu_logp.cpu() - cpu_logp).abs().max() < 1e-3

    stats = learner.train_step(batch, kl_coef=0.01)
    assert torch.isfinite(torch.tensor(stats["policy/loss"]))
    assert stats["learner/grad_norm"] > 0
    state = learner.full_state_dict()
    assert all(t.device.type == "cpu" for t in state.values())


def test_bf16_step_with_and_without_checkpointing_reports_peak_memory(nccl_group, tiny_model_path, capsys):
    """One bf16 step (fp32 master weights) per checkpointing setting; prints peak memory for the note."""
    batch = _batch(n=8, length=64)
    peaks = {}
    for checkpointing in (False, True):
        cfg = JobConfig.model_validate({"learner": {"world_size": 1, "mixed_precision": "bf16",
                                                    "gradient_checkpointing": checkpointing}})
        learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        stats = learner.train_step(batch, kl_coef=0.01)
        torch.cuda.synchronize()
        peaks[checkpointing] = torch.cuda.max_memory_allocated()
        assert torch.isfinite(torch.tensor(stats["policy/loss"])) and stats["learner/grad_norm"] > 0
        assert all(p.dtype == torch.float32 for p in learner.model.parameters()), "master weights stay fp32"
        del learner
    with capsys.disabled():
        print(f"\nbf16 learner step peak memory: {peaks[False] / 2**20:.1f} MiB without checkpointing, "
              f"{peaks[True] / 2**20:.1f} MiB with")
    assert peaks[True] <= peaks[False]


def test_deepspeed_zero3_step_on_cuda(nccl_group, tiny_model_path):
    """The DeepSpeed backend on CUDA (NCCL, world size 1): its step runs on the GPU and the
    gathered weights come back as fp32 CPU tensors with the HF names."""
    from rlhf_cluster.learner.deepspeed import DeepSpeedLearner

    cfg = JobConfig.model_validate({"learner": {"backend": "deepspeed", "world_size": 1, "mixed_precision": "bf16"}})
    learner = DeepSpeedLearner(LearnerSpec.of_policy(cfg), tiny_model_path)
    assert learner.device.type == "cuda"
    stats = learner.train_step(_batch(), kl_coef=0.01)
    assert torch.isfinite(torch.tensor(stats["policy/loss"])) and stats["learner/grad_norm"] > 0
    assert stats["learner/skipped_updates"] == 0
    state = learner.full_state_dict()
    assert set(state) == set(load_causal_lm(tiny_model_path).state_dict())
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())


def _ragged_batch():
    """Rows of unequal prompt and response lengths (packing has padding to remove)."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for i, (p, r) in enumerate(((5, 3), (2, 40), (7, 1), (3, 17), (9, 64), (4, 8))):
        samples.append(ScoredSample(
            sample_id=f"s{i}", prompt_id="p", group_id="g", prompt_ids=torch.randint(2, 250, (p,), generator=g).tolist(),
            response_ids=torch.randint(2, 250, (r,), generator=g).tolist(), rollout_logprobs=[-5.5] * r,
            policy_version=0, finish_reason="length", reward=0.0, reward_components={}, ref_logprobs=[-5.4] * r,
            advantages=[float(i % 3) - 1.0] * r))
    return TrainBatch.from_samples(samples)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_and_packed_log_probs_equal_the_full_logits_on_cuda(tiny_model_path, dtype):
    """Issue 35's default path on CUDA: chunked log-probs and entropies, packed rows, against the
    full-logits padded path, values and gradients."""
    import copy

    b = _ragged_batch()
    ours = load_causal_lm(tiny_model_path, dtype, "cuda")
    theirs = copy.deepcopy(ours)
    args = [t.cuda() for t in (b.input_ids, b.attention_mask, b.prompt_lengths)] + [b.response_mask.shape[1]]
    mask = b.response_mask.cuda()
    a, a_ent = response_logprobs(ours, *args, 1.0, True, chunk_tokens=16)
    c, c_ent = response_logprobs(theirs, *args, 1.0, True, chunk_tokens=None)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert ((a - c) * mask).abs().max() < tol and ((a_ent - c_ent) * mask).abs().max() < tol
    ((a * mask).sum() + (a_ent * mask).sum()).backward()
    ((c * mask).sum() + (c_ent * mask).sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        scale = q.grad.abs().max().clamp_min(1e-6)
        assert ((p.grad - q.grad).abs().max() / scale) < (1e-3 if dtype == torch.float32 else 5e-2), name


def test_the_step_synchronises_with_the_device_once_per_update(nccl_group, tiny_model_path):
    """CUDA's own sync detector (`set_sync_debug_mode("warn")` warns at every synchronising call)
    over a bf16 step of two mini-batches with a token budget: the two updates' reads, and the
    optimizer's (fused AdamW keeps its step counters on the device: none)."""
    import warnings

    cfg = JobConfig.model_validate({"learner": {"world_size": 1, "mixed_precision": "bf16", "mini_batches": 2,
                                                "max_tokens_per_micro_batch": 48},
                                    "algorithm": {"kl": {"placement": "loss", "coef": 0.01}}})
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
    learner.train_step(_ragged_batch(), kl_coef=0.01)  # lazy initialisation is not the step's
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            learner.train_step(_ragged_batch(), kl_coef=0.01)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"synchronising calls in one step: {len(syncs)}")
    assert len(syncs) <= 2 * cfg.learner.mini_batches, syncs  # the reads (a D2H copy may warn twice)
