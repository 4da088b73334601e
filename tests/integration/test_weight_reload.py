"""After a weight reload, a live vLLM engine scores exactly like an HF forward of the published
weights: a version loaded from the store, and one delivered directly (the job's transport's
buckets through the object store). A version whose store files or delivered bytes are damaged is
refused, counted, and the engine keeps serving the last good one. The dense model's checks
(`check_store_and_direct_reloads`) run on the engine of test_streaming_generation.py's first test;
the mixture of experts has an engine of its own here."""

from __future__ import annotations

import urllib.request

import ray
import torch

from actors.workers.generation import GenerationWorker
from actors.workers.settings import GenerationSettings
from rlhf_cluster.models.modeling import load_causal_lm, sequence_logprobs
from rlhf_cluster.weights import WeightStore
from rlhf_cluster.weights.buckets import now
from rlhf_cluster.weights.registry import build_transport

# fp32 engine vs fp32 HF forward: measured max |diff| ~5e-7 on the tiny model; 1e-4 leaves room
# for kernel differences while a stale prefix cache or a missed reload is off by >1e-2.
TOLERANCE = 1e-4


def _changed(model, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}


def _metrics(worker) -> str:
    target = ray.get(worker.info.remote())["metrics"]
    return urllib.request.urlopen(f"http://{target}/metrics", timeout=10).read().decode()


def _scorers(worker, model, prompt_len: int):
    """The log-probs of one fixed pair of random tokens (`prompt_len` prompt tokens, 12 response
    tokens), as two functions: `engine_logprobs()`, the live engine's, and `hf_logprobs(state)`, an
    HF forward's of `model` with `state` loaded (as it is, without one)."""
    prompt_ids = [int(x) for x in torch.randint(2, 250, (prompt_len,), generator=torch.Generator().manual_seed(0))]
    response_ids = [int(x) for x in torch.randint(2, 250, (12,), generator=torch.Generator().manual_seed(1))]

    def engine_logprobs() -> torch.Tensor:
        return torch.tensor(ray.get(worker.logprobs_of.remote(prompt_ids, response_ids)))

    def hf_logprobs(state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if state is not None:
            model.load_state_dict(state)
        return sequence_logprobs(model, prompt_ids, response_ids)

    return engine_logprobs, hf_logprobs


def check_store_and_direct_reloads(worker, cfg, store: WeightStore, model, tmp_path, held: int) -> None:
    """A live engine holding version `held` (`model`'s weights) scores like an HF forward of every
    version it loads from the store (`held` + 1) and of one delivered directly (`held` + 3), as the
    learner's rank 0 publishes it with the job's transport (`cfg.weights`: buckets small enough
    that the tiny model has several); a damaged version in the store (`held` + 2) and a damaged
    bucket are refused and counted, and the engine keeps serving the last good version. Run on
    the engine of tests/integration/test_streaming_generation.py's first test (an engine's start
    is most of either check's time), after its batching and its version loaded in flight."""
    # A prompt longer than several KV blocks, so a stale prefix cache would be reused.
    engine_logprobs, hf_logprobs = _scorers(worker, model, 70)
    good, damaged, delivered_version = held + 1, held + 2, held + 3

    before = engine_logprobs()
    assert (before - hf_logprobs()).abs().max() < TOLERANCE

    # From the store.
    store.publish(good, _changed(model, 3))
    assert ray.get(worker.sync.remote(good)) == good
    after = engine_logprobs()
    expected = hf_logprobs(store.load(good))
    assert (after - expected).abs().max() < TOLERANCE
    assert (before - expected).abs().max() > 100 * TOLERANCE, "the new weights must change the log-probs"

    # A corrupted version in the store is refused, and the engine keeps serving the good one.
    store.publish(damaged, _changed(model, 4))
    shard = store.version_dir(damaged) / "model-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01  # one flipped bit in the tensor bytes
    shard.write_bytes(bytes(data))
    assert ray.get(worker.sync.remote(good)) == good, "the corrupted version must not be loaded"
    assert ray.get(worker.refused_versions.remote()) == [damaged]
    assert torch.equal(engine_logprobs(), after), "generation must keep serving the last good version"

    # Delivered directly, as the learner's rank 0 publishes it with the job's transport; a damaged
    # bucket is refused and counted, and the engine still serves the good version.
    state = _changed(model, 5)
    sender = build_transport(cfg.weights, WeightStore(tmp_path / "sender"), ["full"], torch.float32, put=ray.put)
    delivery = sender.publish(delivered_version, now(), state.items(), {}, snapshot=False).result().delivery
    manifest = delivery.link("full").packed()
    assert len(manifest.buckets) >= 3
    ray.get(worker.corrupt_next_delivery.remote(1))
    receipt = ray.get(worker.load.remote(delivery), timeout=120)
    assert receipt.status == "refused" and "bucket 1: checksum" in receipt.reason and receipt.held_version == good, (
        receipt)
    assert torch.equal(engine_logprobs(), after), "the engine must keep the good version"
    assert 'rlhf_weights_fingerprint_mismatches_total{job="test",pool="generation",worker="gen0"} 1.0' in _metrics(
        worker)

    # The same version, undamaged, is loaded and proven, and the engine then scores like it.
    receipt = ray.get(worker.load.remote(delivery), timeout=120)
    assert receipt.loaded and receipt.fingerprint == manifest.fingerprint == receipt.sent_fingerprint, receipt
    delivered = engine_logprobs()
    assert (delivered - hf_logprobs(state)).abs().max() < TOLERANCE
    assert (delivered - after).abs().max() > 1e-2, "the two versions must differ to prove anything"
    delivered_bytes = [float(line.rsplit(" ", 1)[1]) for line in _metrics(worker).splitlines()
                       if line.startswith("rlhf_weights_delivery_bytes_total{") and 'transport="direct"' in line
                       and 'worker="gen0"' in line]
    assert delivered_bytes == [manifest.total_bytes], delivered_bytes  # only the loaded delivery counts


def test_an_moe_version_reaches_the_engine_by_store_and_direct_and_scores_like_hf(ray_cluster, job_config,
                                                                                   model_cache, tmp_path):
    """The tiny Qwen3-MoE, sent as the learner holds it (transformers 5 stacks each layer's experts):
    the weights code splits the experts as the model folder has them, vLLM's loader fuses them into
    its w13/w2 stacks, the receipt is proven by the sender's fingerprint, and the engine then scores
    like an HF forward of the sent weights. The `collective` transport carries the same tensors
    (tests/unit/test_moe_transports.py)."""
    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    moe_path = str(ensure_tiny_model(TinyModelConfig(architecture="qwen3_moe"), model_cache))
    cfg = job_config(weights={"transport": {"type": "direct", "bucket_mb": 0.05}})
    store = WeightStore(cfg.weights_dir)
    model = load_causal_lm(moe_path)
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in model.state_dict())
    worker = GenerationWorker.remote(GenerationSettings.of(cfg), moe_path, 0)
    try:
        engine_logprobs, hf_logprobs = _scorers(worker, model, 40)
        before = engine_logprobs()
        assert (before - hf_logprobs()).abs().max() < TOLERANCE

        store.publish(1, _changed(model, 3))  # filesystem: the store holds the folder's per-expert tensors
        assert ray.get(worker.sync.remote(1)) == 1
        after = engine_logprobs()
        assert (after - hf_logprobs(_changed(model, 3))).abs().max() < TOLERANCE
        assert (before - after).abs().max() > 100 * TOLERANCE, "the new weights must change the log-probs"

        state = _changed(model, 5)
        sender = build_transport(cfg.weights, WeightStore(tmp_path / "sender"), ["full"], torch.float32, put=ray.put)
        delivery = sender.publish(2, now(), state.items(), {}, snapshot=False).result().delivery
        receipt = ray.get(worker.load.remote(delivery), timeout=120)
        assert receipt.loaded and receipt.fingerprint == delivery.link("full").fingerprint == receipt.sent_fingerprint
        delivered = engine_logprobs()
        assert (delivered - hf_logprobs(state)).abs().max() < TOLERANCE
        assert (delivered - after).abs().max() > 1e-2, "the two versions must differ to prove anything"
    finally:
        ray.kill(worker)
