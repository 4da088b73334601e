"""Direct weight delivery's pure half: packing, checks, fingerprints, the persist rule."""

import pytest
import torch

from rlhf_cluster.models.quantization import quantize_state_dict
from rlhf_cluster.weights.buckets import (
    DeliveryError, DeliveryManifest, Staging, VersionPacker, pack_buckets, persisted, unpack_bucket, verified_tensors,
)


def _state(layers: int = 3, hidden: int = 32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(50, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{p}.self_attn.{proj}.weight"] = torch.randn(hidden, hidden)
        state[f"{p}.self_attn.q_proj.bias"] = torch.randn(hidden)
        for proj in ("gate_proj", "up_proj"):
            state[f"{p}.mlp.{proj}.weight"] = torch.randn(2 * hidden, hidden)
        state[f"{p}.mlp.down_proj.weight"] = torch.randn(hidden, 2 * hidden)
        state[f"{p}.input_layernorm.weight"] = torch.ones(hidden)
    state["model.norm.weight"] = torch.ones(hidden)
    state["lm_head.weight"] = torch.randn(50, hidden)
    return state


def _pack(state, variant="full", dtype=torch.float32, bucket_bytes=20_000):
    payloads = []
    packer = VersionPacker(3, "2026-11-23T00:00:00", variant, dtype, bucket_bytes,
                           lambda p: payloads.append(p) or len(payloads) - 1)
    manifest, handles = packer.pack(state.items())
    assert handles == list(range(len(payloads)))
    return manifest, payloads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact_in_the_engine_dtype(dtype):
    state = _state()
    manifest, payloads = _pack(state, dtype=dtype)
    tensors, fp = verified_tensors(manifest, payloads)
    assert [n for n, _ in tensors] == list(state)  # order kept
    for name, t in tensors:
        assert t.dtype == dtype
        assert torch.equal(t, state[name].to(dtype)), name
    assert fp == manifest.fingerprint
    assert manifest.total_bytes == sum(p.nbytes for p in payloads)
    # bf16/fp16 halve what travels.
    if dtype != torch.float32:
        assert manifest.total_bytes < 0.6 * _pack(state)[0].total_bytes


@pytest.mark.parametrize("variant", ["full", "int8"])
def test_a_reused_staging_buffer_packs_the_bytes_a_fresh_one_does(variant):
    """The object store transport packs every bucket in one reused buffer (its `put` copies the
    bytes away): no byte of an earlier bucket or version (odd-sized tensors leave alignment gaps)
    reaches a later bucket's bytes or checksum."""
    staging = Staging(reuse=True)
    state = {name: t[..., :-1].contiguous() for name, t in _state().items()}  # odd sizes: gaps to zero

    def packed(tensors, dtype):
        payloads = []
        packer = VersionPacker(3, "2026-11-23T00:00:00", variant, dtype, 20_000,
                               lambda p: payloads.append(p.copy()) or len(payloads) - 1, staging)
        return packer.pack(tensors.items())[0], payloads

    packed({name: torch.full_like(t, float("nan")) for name, t in state.items()}, torch.float32)  # garbage left behind
    held = staging.buffer(1, pinned=False).data_ptr()
    assert not staging.pinned  # CPU tensors: plain memory
    manifest, payloads = packed(state, torch.bfloat16)
    fresh, fresh_payloads = _pack(state, variant, torch.bfloat16)
    assert len(manifest.buckets) > 1
    assert manifest.fingerprint == fresh.fingerprint
    assert all(a.tobytes() == b.tobytes() for a, b in zip(payloads, fresh_payloads))
    assert staging.buffer(1, pinned=False).data_ptr() == held  # the same memory, bucket after bucket
    tensors, _ = verified_tensors(manifest, payloads)
    assert dict(tensors).keys() == dict(verified_tensors(fresh, fresh_payloads)[0]).keys()


def test_int8_variant_is_what_the_store_variant_holds():
    state = _state()
    manifest, payloads = _pack(state, variant="int8")
    tensors = dict(verified_tensors(manifest, payloads)[0])
    expected = quantize_state_dict(state, torch.float32)
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name


def test_buckets_never_split_a_layer_and_respect_the_size():
    state = _state(layers=4)
    buckets = list(pack_buckets(state.items(), 20_000))
    assert len(buckets) > 2
    owners = {}
    for index, (spec, _) in enumerate(buckets):
        for slot in spec.tensors:
            layer = slot.name.split(".self_attn")[0].split(".mlp")[0].split(".input_layernorm")[0]
            owners.setdefault(layer, set()).add(index)
    assert all(len(b) == 1 for b in owners.values()), owners
    # Every bucket but the last reached the size before it was closed.
    assert all(spec.nbytes >= 20_000 for spec, _ in buckets[:-1])
    # A huge bucket size gives one bucket.
    assert len(list(pack_buckets(state.items(), 1 << 40))) == 1


def test_tensors_are_views_of_the_payload_not_copies():
    manifest, payloads = _pack(_state())
    name, view = unpack_bucket(manifest.buckets[0], payloads[0])[0]
    assert view.untyped_storage().data_ptr() == torch.from_numpy(payloads[0]).untyped_storage().data_ptr()


def test_a_flipped_byte_or_a_missing_bucket_is_refused_before_unpacking():
    manifest, payloads = _pack(_state())
    damaged = bytearray(payloads[1].tobytes())
    damaged[7] ^= 0x01
    with pytest.raises(DeliveryError, match="bucket 1: checksum"):
        verified_tensors(manifest, [payloads[0], damaged, *payloads[2:]])
    with pytest.raises(DeliveryError, match="bucket 1: .* bytes arrived"):
        verified_tensors(manifest, [payloads[0], payloads[1][:-1], *payloads[2:]])
    with pytest.raises(DeliveryError, match="buckets arrived"):
        verified_tensors(manifest, payloads[:-1])
    # The corrupt hook sees each bucket once.
    hook = lambda i, p: damaged if i == 1 else p  # noqa: E731
    with pytest.raises(DeliveryError, match="bucket 1"):
        verified_tensors(manifest, payloads, corrupt=hook)


def test_fingerprint_names_the_version_identity_and_survives_serialisation():
    manifest, _ = _pack(_state())
    again = DeliveryManifest.from_dict(manifest.to_dict())
    assert again == manifest and again.fingerprint == manifest.fingerprint
    republished = DeliveryManifest(manifest.version, "2026-11-24T00:00:00", manifest.variant, manifest.buckets)
    assert republished.fingerprint != manifest.fingerprint  # a rollback's republished number is another version
    other, _ = _pack({k: v + 1 for k, v in _state().items()})
    assert other.fingerprint != manifest.fingerprint


def test_persist_rule():
    kept = [v for v in range(0, 13) if persisted(v, persist_every=5, checkpoint_every=4, total_steps=11)]
    assert kept == [0, 4, 5, 8, 10, 11, 12]
    # A version the KL reference is refreshed from (algorithm.kl.reference_refresh) is read from the store too.
    kept = [v for v in range(0, 13) if persisted(v, 5, 4, 11, refresh_every=3)]
    assert kept == [0, 3, 4, 5, 6, 8, 9, 10, 11, 12]
