"""The DeepSpeed ZeRO-3 learner computes FSDP2's update, checkpoints exactly, and runs the pipeline.

Real parts only: LearnerRank Ray actors forming a 2-rank gloo group, real FSDP2 and real
DeepSpeed (ZeRO stage 3, torch's AdamW), the tiny random model, and for the pipeline test the
whole driver with vLLM generation.
"""

from __future__ import annotations


from functools import partial

import pytest
import ray
import torch

from actors.job import Job
from actors.workers.learner import LearnerRank
from actors.workers.rank_group import RankGroup
from actors.workers.settings import LearnerRankSettings
from rlhf_cluster.config import DirectTransport, ResourcesConfig
from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.weights import WeightStore
from tests.job_configs import small_job_config

# Test modules sit on sys.path by their basename (pytest's default import mode): share their fixtures' data.
from test_learner_ranks import _samples
from test_pipeline import _initial_weights

# One AdamW step from equal weights. Both backends run the same forward/backward kernels on the
# same full parameters and micro-batches; they differ only in how the 2-rank gradient sum and the
# division by the world size are ordered, i.e. by fp32 rounding of the reduced gradient. AdamW's
# first update is lr * g / (|g| + eps) with eps = 1e-8: for almost every element that is
# insensitive to rounding, but for elements whose gradient cancels to ~0 (attention key biases
# have an exactly-zero true gradient) a rounding difference of ~1e-11 in g moves the update by
# lr * 1e-3. Measured on this batch: max |diff| 1.2e-6 (layer 0 k_proj.bias), 36 of 107328
# elements above 1e-8, 981 above 1e-9 (one fp32 ulp of a 0.02 weight is ~2e-9). So:
PARAM_ATOL = 1e-5  # lr / 100: bounds the rounding-amplified elements with a 8x margin
PARAM_ELEMENT_ATOL, MAX_FRACTION_ABOVE = 1e-8, 1e-3  # ...while nearly every element agrees to a few ulps
# A wrong gradient scale barely moves Adam's first step (it is scale-invariant), so the gradient
# itself is checked through the loss and the pre-clip global gradient norm, each backend's own.
LR = 1e-3


def _group(cfg, model_path, world) -> RankGroup:
    settings = LearnerRankSettings.of(cfg)
    return RankGroup(LearnerRank, lambda r: (settings, model_path, r, world), ResourcesConfig(), world)


def _kill(ranks):
    ranks.kill()


def _config(job_config, run_dir, backend, **learner):
    """A 2-rank learner of `backend` with the KL term in the loss (`run_dir` None: job_config's own)."""
    return job_config(reference=True,
        **({"run_dir": str(run_dir)} if run_dir is not None else {}),
        learner={"backend": backend, "world_size": 2, "lr": LR, **learner},
        algorithm={"kl": {"placement": "loss", "coef": 0.1}, "loss": {"aggregation": "token_mean"}},
    )


def _train(ranks, shards, version):
    return [metrics for metrics, _ in ray.get([rank.train.remote(TrainBatch.from_samples(s), version, 0.1)
                                              for rank, s in zip(ranks, shards)])]


# One step's batch for the backend comparisons: 8 samples over 2 ranks of unequal lengths.
SAMPLES = _samples(8)
SHARDS = [SAMPLES[:2], SAMPLES[2:]]
SEQ_LEN = max(len(s.prompt_ids) + len(s.response_ids) for s in SAMPLES)
# Micro-batching (rank 1 needs more micro-batches, rank 0 pads) and active clipping (the pre-clip
# gradient norm of this batch is 0.86, checked below: 0.5 clips it) are on, so accumulation, the
# global denominator and the clip all count. Warmup: the first step runs at lr / 2, so the tests
# also see DeepSpeed take our schedule's lr.
STEP_SETTINGS = {"max_grad_norm": 0.5, "lr_warmup_steps": 2, "max_tokens_per_micro_batch": 2 * SEQ_LEN}


@pytest.fixture(scope="module")
def first_step(ray_cluster, model_cache, tiny_model_path, tmp_path_factory):
    """`first_step(backend)`: every rank's metrics and the gathered weights after one step on
    SHARDS with STEP_SETTINGS, run once per module (the DeepSpeed step is also the reference of
    the switches test)."""
    done: dict = {}

    def step(backend: str) -> tuple[list[dict], dict]:
        if backend not in done:
            cfg = _config(partial(small_job_config, tmp_path_factory.mktemp(backend), model_cache), None,
                          backend, **STEP_SETTINGS)
            ranks = _group(cfg, tiny_model_path, 2)
            try:
                done[backend] = _train(ranks, SHARDS, 1), ray.get([r.full_state_dict.remote() for r in ranks])[0]
            finally:
                _kill(ranks)
        return done[backend]

    return step


def test_deepspeed_zero3_step_equals_fsdp2_step(first_step, job_config):
    """Same weights, batch and seed at world size 2: one step of each backend gives the same
    parameters."""
    results, weights = {}, {}
    for backend in ("fsdp2", "deepspeed"):
        stats, weights[backend] = first_step(backend)
        assert stats[0]["policy/loss"] == pytest.approx(stats[1]["policy/loss"], abs=1e-9), "ranks disagree"
        results[backend] = stats[0]
    cfg = _config(job_config, None, "deepspeed")
    fsdp2, ds = results["fsdp2"], results["deepspeed"]
    assert fsdp2["learner/grad_norm"] > 0.5, "clipping must be active for this test to check it"
    assert ds["policy/loss"] == pytest.approx(fsdp2["policy/loss"], rel=1e-6, abs=1e-7)
    assert ds["learner/grad_norm"] == pytest.approx(fsdp2["learner/grad_norm"], rel=1e-5)
    assert ds["learner/tokens"] == fsdp2["learner/tokens"]
    assert ds["learner/skipped_updates"] == 0 and ds["learner/lr"] == fsdp2["learner/lr"] == LR  # the next step's
    # Same names and shapes as FSDP2's (= the HF checkpoint's), fp32.
    assert set(weights["deepspeed"]) == set(weights["fsdp2"])
    assert all(weights["deepspeed"][k].dtype == torch.float32 == weights["fsdp2"][k].dtype for k in weights["fsdp2"])
    diffs = {k: float((weights["deepspeed"][k] - weights["fsdp2"][k]).abs().max()) for k in weights["fsdp2"]}
    worst = max(diffs, key=diffs.get)
    every = torch.cat([(weights["deepspeed"][k] - weights["fsdp2"][k]).abs().flatten() for k in weights["fsdp2"]])
    above = float((every > PARAM_ELEMENT_ATOL).float().mean())
    print(f"fsdp2 vs deepspeed: max |param diff| {diffs[worst]:.3e} ({worst}); fraction above {PARAM_ELEMENT_ATOL}: {above:.2e}")
    assert diffs[worst] <= PARAM_ATOL, (worst, diffs[worst])
    assert above <= MAX_FRACTION_ABOVE, above
    # ...and the step did move the weights by ~lr / 2 (Adam's first step at half the lr), far more
    # than the tolerance.
    moved = max(float((weights["deepspeed"][k] - v).abs().max()) for k, v in _initial_weights(cfg).items())
    assert 0.4 * LR < moved < 0.6 * LR, moved


# `make test` runs the DeepSpeed case; FSDP2's restore is checked there by test_resume (every rank's
# digest after a resume at world size 2) and test_replay (a restored rank continues bit-identically).
@pytest.mark.parametrize("backend", [pytest.param("fsdp2", marks=pytest.mark.slow), "deepspeed"])
def test_checkpoint_round_trips_exactly(ray_cluster, job_config, tiny_model_path, tmp_path, backend):
    """Save after step 1, restore into a fresh group: every rank's model/master/optimizer shards,
    scheduler and step hash equal (digest), the gathered weights are bitwise equal, and step 2
    after the restore is bitwise the step 2 the original group took without it."""
    samples = _samples(6)
    step1 = [samples[:2], samples[2:4]]
    step2 = [samples[4:5], samples[5:]]
    cfg = _config(job_config, tmp_path / "run", backend, lr_warmup_steps=4)
    ckpt = tmp_path / "ckpt"
    (ckpt / "learner").mkdir(parents=True)
    (ckpt / "rng").mkdir()

    original = _group(cfg, tiny_model_path, 2)
    _train(original, step1, 1)
    saved_digests = ray.get([rank.save_checkpoint.remote(str(ckpt)) for rank in original])
    ray.get([rank.wait_checkpoint.remote() for rank in original])
    saved_weights = ray.get([rank.full_state_dict.remote() for rank in original])[0]
    uninterrupted = _train(original, step2, 2)
    uninterrupted_weights = ray.get([rank.full_state_dict.remote() for rank in original])[0]
    _kill(original)

    restored = _group(cfg, tiny_model_path, 2)
    loaded_digests = ray.get([rank.load_checkpoint.remote(str(ckpt)) for rank in restored])
    assert loaded_digests == saved_digests
    assert len(set(saved_digests)) == 2, "each rank holds (and saved) its own partition"
    loaded_weights = ray.get([rank.full_state_dict.remote() for rank in restored])[0]
    assert all(torch.equal(loaded_weights[k], v) for k, v in saved_weights.items())
    resumed = _train(restored, step2, 2)
    resumed_weights = ray.get([rank.full_state_dict.remote() for rank in restored])[0]
    _kill(restored)

    # Warmup makes the lr depend on the restored scheduler: after 2 steps of 4, the next lr is 3/4 of lr.
    assert resumed[0]["learner/lr"] == uninterrupted[0]["learner/lr"] == pytest.approx(LR * 3 / 4)
    assert resumed[0]["policy/loss"] == uninterrupted[0]["policy/loss"]
    assert resumed[0]["learner/grad_norm"] == uninterrupted[0]["learner/grad_norm"]
    assert all(torch.equal(resumed_weights[k], v) for k, v in uninterrupted_weights.items())
    assert any(not torch.equal(resumed_weights[k], v) for k, v in saved_weights.items()), "step 2 changed nothing"


def test_pipeline_runs_on_deepspeed_ranks(ray_cluster, job_config):
    """The whole job (vLLM generation, scoring, buffer, weight store) on a 2-rank DeepSpeed
    ZeRO-3 learner: versions advance, ZeRO-3 partitions every parameter across the ranks, every
    version reaches the engine by direct delivery from the DeepSpeed ranks (the default
    transport), proven by fingerprint, and the published weights are the trained ones and differ
    from the initial weights."""
    steps = 2
    cfg = job_config(
        generation={"replicas": 1, "prompts_per_request": 2, "sampling": {"n": 4, "max_new_tokens": 8}},
        learner={"backend": "deepspeed", "world_size": 2, "lr": 1e-3},
        train={"total_steps": steps, "prompts_per_step": 2, "max_staleness": 1, "progress": False},
        weights={"persist_every": 1},  # every version on disk too: the test compares them
    )
    job = Job(cfg)
    try:
        result = job.run()
        assert [r["weight_version"] for r in result.rows] == list(range(1, steps + 1))
        assert WeightStore(cfg.weights_dir).latest_version() == steps
        assert isinstance(cfg.weights.transport, DirectTransport)
        receipts = job.delivery_receipts
        assert [r.version for r in receipts if r.loaded] == list(range(steps + 1)), receipts
        assert all(r.proven for r in receipts), receipts

        infos = ray.get([rank.shard_info.remote() for rank in job.learner_ranks])
        for name, (local0, full) in infos[0].items():
            local1, _ = infos[1][name]
            assert local0 + local1 >= full and local0 < full and local1 < full, (name, local0, local1, full)

        gathered = ray.get([rank.full_state_dict.remote() for rank in job.learner_ranks])[0]
        published = WeightStore(cfg.weights_dir).load(steps)
        assert set(gathered) == set(published)
        assert all(torch.equal(tensor, published[key]) for key, tensor in gathered.items())
        first = WeightStore(cfg.weights_dir).load(1)
        assert any(not torch.equal(first[k], v) for k, v in published.items()), "step 2 published the same weights"
        assert any(not torch.equal(published[k], v) for k, v in _initial_weights(cfg).items())
    finally:
        job.shutdown()


def test_deepspeed_checkpointing_offload_bf16_and_nan_skip(first_step, job_config, tiny_model_path, tmp_path):
    """The DeepSpeed learner's switches do what they say at world size 2, against the plain
    DeepSpeed step of `first_step`.

    Gradient checkpointing recomputes the same activations and CPU offload steps the same AdamW
    on CPU copies: together they leave the step unchanged (same loss and gradient norm to fp32
    rounding, parameters within PARAM_ATOL). bf16 (DeepSpeed's bf16 mode) changes the step only
    by bf16 rounding, and the gathered weights are the fp32 master weights. A NaN loss on one
    rank skips the update on both, and the next finite step updates normally.
    """
    fp32_stats, fp32_weights = first_step("deepspeed")
    results, weights = {"fp32": fp32_stats[0]}, {"fp32": fp32_weights}
    settings = {
        "checkpointing_offload": {"gradient_checkpointing": True,
                                  "deepspeed": {"offload_optimizer": True, "offload_params": True}},
        "bf16": {"mixed_precision": "bf16"},
    }
    for name, learner in settings.items():
        cfg = _config(job_config, tmp_path / name, "deepspeed", **{**STEP_SETTINGS, **learner})
        ranks = _group(cfg, tiny_model_path, 2)
        results[name] = _train(ranks, SHARDS, 1)[0]
        weights[name] = ray.get([rank.full_state_dict.remote() for rank in ranks])[0]
        if name == "bf16":
            nan_shards = [_samples(8)[:2], _samples(8)[2:]]
            nan_shards[0][0].advantages = [float("nan")] * len(nan_shards[0][0].advantages)
            skipped = _train(ranks, nan_shards, 2)
            after_nan = ray.get([rank.full_state_dict.remote() for rank in ranks])[0]
            assert [s["learner/skipped_updates"] for s in skipped] == [1.0, 1.0]
            assert all(torch.equal(after_nan[k], v) for k, v in weights[name].items()), "a NaN step changed weights"
            assert _train(ranks, SHARDS, 3)[0]["learner/skipped_updates"] == 0
            after = ray.get([rank.full_state_dict.remote() for rank in ranks])[0]
            assert any(not torch.equal(after[k], v) for k, v in after_nan.items()), "the finite step after a NaN did nothing"
        _kill(ranks)
    fp32, same, bf16 = results["fp32"], results["checkpointing_offload"], results["bf16"]
    assert same["policy/loss"] == pytest.approx(fp32["policy/loss"], rel=1e-6, abs=1e-7)
    assert same["learner/grad_norm"] == pytest.approx(fp32["learner/grad_norm"], rel=1e-5)
    diff = max(float((weights["checkpointing_offload"][k] - v).abs().max()) for k, v in weights["fp32"].items())
    assert diff <= PARAM_ATOL, diff
    # bf16 has 8 mantissa bits: the gradient norm agrees to a few percent, not to fp32 precision.
    rel = abs(bf16["learner/grad_norm"] - fp32["learner/grad_norm"]) / fp32["learner/grad_norm"]
    assert 0 < rel < 0.05, rel
    assert all(t.dtype == torch.float32 for t in weights["bf16"].values())
    # fp32 master weights: AdamW's first step moves a weight by ~lr whatever the gradient's
    # rounding, so bf16 and fp32 runs give nearly the same fp32 weights; weights kept in bf16
    # would be off by up to half a bf16 step (~4e-5 for a 0.02 weight) almost everywhere.
    every = torch.cat([(weights["bf16"][k] - v).abs().flatten() for k, v in weights["fp32"].items()])
    close = float((every <= 1e-6).float().mean())
    print(f"bf16 vs fp32 DeepSpeed step: grad-norm rel diff {rel:.2e}, fraction of weights within 1e-6: {close:.4f}")
    assert close > 0.95, close
