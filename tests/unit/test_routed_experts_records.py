"""Routing replay's experience half: a sample's routed experts travel with it from its rollout
through the build, the Arrow tables, the buffer, a checkpoint and a resume, byte for byte."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rlhf_cluster.config import AlgorithmConfig, JobConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.buffer import ExperienceBuffer
from rlhf_cluster.experience.build import build_group, finalize_batch
from rlhf_cluster.experience.records import (
    SAMPLE_SCHEMA,
    Rollout,
    ScoredSample,
    TrainBatch,
    samples_to_table,
    table_to_samples,
)
from rlhf_cluster.experience.routing_column import ROUTED_EXPERTS_TYPE
from rlhf_cluster.models.routed_experts import RoutedExperts, compact_routing
from rlhf_cluster.run.checkpoint import CheckpointStore
from rlhf_cluster.run.job_state import JobState

PROMPT, RESPONSE = [1, 2, 3, 4], [5, 6, 7]  # 7 tokens: the engine runs positions 0..5


def _routing(seed: int, tokens: int = 6, start: int = 0, experts: int = 8, layers: int = 3, top_k: int = 2):
    """Random distinct top-k experts per token and layer, compacted as the engine's would be."""
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((tokens, layers, experts)), axis=-1)[..., :top_k]
    return compact_routing(picks, experts, start=start)


def _sample(sid: str, routed: RoutedExperts | None, group: str = "g0", version: int = 0) -> ScoredSample:
    n = len(RESPONSE)
    return ScoredSample(
        sample_id=sid,
        prompt_id=group,
        group_id=group,
        prompt_ids=list(PROMPT),
        response_ids=list(RESPONSE),
        rollout_logprobs=[-1.0] * n,
        policy_version=version,
        finish_reason="stop",
        reward=float(sid[-1] == "1"),
        reward_components={},
        ref_logprobs=[-1.5] * n,
        advantages=[0.5] * n,
        routed_experts=routed,
    )


def _rollout(sid: str, routed: RoutedExperts | None) -> Rollout:
    return Rollout(
        sample_id=sid,
        prompt_id="p0",
        group_id="g0",
        prompt_ids=list(PROMPT),
        response_ids=list(RESPONSE),
        rollout_logprobs=[-1.0] * len(RESPONSE),
        policy_version=0,
        finish_reason="stop",
        routed_experts=routed,
    )


def test_the_schema_holds_a_nullable_routing_struct():
    field = SAMPLE_SCHEMA.field("routed_experts")
    assert field.nullable and field.type == ROUTED_EXPERTS_TYPE
    assert [f.name for f in ROUTED_EXPERTS_TYPE] == ["start", "layers", "top_k", "wide", "data"]
    assert [f.name for f in SAMPLE_SCHEMA if f.nullable] == ["routed_experts"]


def test_narrow_wide_and_missing_routings_round_trip_byte_for_byte():
    narrow = _routing(0)
    wide = _routing(1, tokens=3, start=2, experts=300, top_k=4)
    assert not narrow.wide and wide.wide and wide.tokens == 3 and len(wide.data) == 3 * 3 * 4 * 2
    samples = [_sample("s0", narrow), _sample("s1", None), _sample("s2", wide)]
    table = samples_to_table(samples)
    assert table.column("routed_experts").null_count == 1
    back = table_to_samples(table)
    assert [s.routed_experts for s in back] == [narrow, None, wide]
    assert back[2].routed_experts is not None and back[2].routed_experts.data == wide.data
    # Through an Arrow IPC file too (the buffer's and the scored log's format).
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, SAMPLE_SCHEMA) as writer:
        writer.write_table(table)
    read = pa.ipc.open_file(sink.getvalue()).read_all()
    assert [s.routed_experts for s in table_to_samples(read)] == [narrow, None, wide]


def test_a_table_written_before_the_field_reads_without_routing():
    old = samples_to_table([_sample("s0", None)]).drop_columns(["routed_experts"])
    assert table_to_samples(old)[0].routed_experts is None
    older = samples_to_table([_sample("s0", None)]).drop_columns(["routed_experts", "loss_mask", "rolled_back_steps"])
    assert table_to_samples(older)[0].routed_experts is None


@pytest.mark.parametrize(
    "routed, expected",
    [
        (_routing(0, tokens=7), r"7 tokens from position 0 do not fit its 7-token sequence.*at most \[6, 3, 2\]"),
        (_routing(0, tokens=3, start=4), r"3 tokens from position 4 .*at most \[2, 3, 2\] uint8 from position 4"),
        (RoutedExperts(-1, 3, 2, False, bytes(6)), r"from position -1"),
        (RoutedExperts(0, 3, 2, False, bytes(7)), r"7 bytes are not whole rows of \[tokens, 3, 2\] uint8"),
        (RoutedExperts(0, 3, 2, True, bytes(6)), r"6 bytes are not whole rows of \[tokens, 3, 2\] uint16"),
        (RoutedExperts(0, 0, 2, False, b""), r"not whole rows of \[tokens, 0, 2\]"),
    ],
)
def test_a_routing_that_does_not_fit_its_sample_is_refused_naming_it(routed, expected):
    with pytest.raises(ValueError, match=f"sample bad: routed experts .*{expected}"):
        _sample("bad", routed)
    with pytest.raises(ValueError, match=f"sample bad: routed experts .*{expected}"):
        _rollout("bad", routed)


def test_a_routing_of_every_run_position_fits_and_a_non_record_is_refused():
    assert _sample("ok", _routing(0, tokens=6)).routed_experts is not None  # positions 0..5 of 7
    assert _rollout("ok", _routing(0, tokens=2, start=4)).routed_experts is not None  # 4..5
    with pytest.raises(TypeError, match="sample bad: routed_experts must be a RoutedExperts"):
        _sample("bad", {"start": 0})  # type: ignore[arg-type]


def test_the_build_keeps_each_rollouts_routing_and_train_batches_carry_them_in_order():
    routings = [_routing(i) for i in range(3)] + [None]
    rollouts = [_rollout(f"g0-{i}", r) for i, r in enumerate(routings)]
    samples, _ = build_group(
        rollouts, [(float(i % 2), {}) for i in range(4)], None, AlgorithmConfig(), kl_coef=0.0, max_new_tokens=8
    )
    assert [s.routed_experts for s in samples] == routings
    batch, _ = finalize_batch(samples, AlgorithmConfig(), 0.0)
    assert [s.routed_experts for s in batch.samples] == routings
    for share in batch.policy_shares(2):  # rows rebalanced: each row's routing is its sample's
        assert share.routings == [routings[int(sid[-1])] for sid in share.sample_ids]
    whole = TrainBatch.from_samples(list(reversed(samples)))
    assert whole.routings == list(reversed(routings))
    assert TrainBatch.from_samples([_sample("s0", None), _sample("s1", None)]).routings is None


def test_the_buffers_file_keeps_routings(tmp_path):
    buffer = ExperienceBuffer(capacity=8)
    buffer.add_group([_sample("a0", _routing(0)), _sample("a1", None)])
    buffer.add_group([_sample("b0", _routing(1, experts=300), group="g1")])
    restored = ExperienceBuffer(capacity=8)
    assert restored.load(buffer.save(tmp_path / "buffer.arrow")) == 3
    got = {s.sample_id: s.routed_experts for s in restored.take(2, min_version=0) or []}
    assert got == {"a0": _routing(0), "a1": None, "b0": _routing(1, experts=300)}


def _job(tmp_path) -> JobConfig:
    return JobConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "train": {"prompts_per_step": 2, "max_staleness": 2, "total_steps": 4, "progress": False},
            "generation": {"mode": "streaming", "max_num_seqs": 8, "sampling": {"n": 2}},
        }
    )


def test_a_resumed_job_gets_every_buffered_and_logged_routing_back(tmp_path):
    """The resume's own path: the checkpoint's buffer file, then the scored log's groups from
    after it (one of them from weights the rollback abandons, rewritten by `roll_back`)."""
    cfg, prompts = _job(tmp_path), [Prompt(f"p{i}", f"{i}+1=", str(i + 1)) for i in range(4)]
    state = JobState(cfg, prompts)
    groups = [
        [_sample(f"g{g}-{i}", _routing(2 * g + i, experts=8 if g % 2 else 300), f"g{g}", g) for i in range(2)]
        for g in range(3)
    ]
    groups[1][1] = _sample("g1-1", None, "g1", 1)
    state.add_group(groups[0], {"zero_signal": 0.0}, "gen0")  # in the checkpoint's buffer
    store = CheckpointStore(tmp_path / "ckpt")
    tmp = store.begin(0)
    state.save(0, tmp)
    ckpt = store.finalize(tmp, 0, 1)  # version 1
    for group in groups[1:]:  # scored after the checkpoint; version 2 is rolled back on resume
        state.add_group(group, {"zero_signal": 0.0}, "gen0")
    state.log.flush()

    resumed = JobState(cfg, prompts)
    resumed.load(ckpt)
    assert resumed.recovered["reused"] == 2 and resumed.recovered["rolled_back"] == 1
    got = {s.sample_id: s for s in resumed.buffer.take(3, min_version=-10) or []}
    expected = {s.sample_id: s.routed_experts for group in groups for s in group}
    assert {sid: s.routed_experts for sid, s in got.items()} == expected
    assert got["g2-0"].rolled_back_steps == 1 and got["g2-0"].routed_experts == _routing(4, experts=300)
