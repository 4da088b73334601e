import datetime as dt

import pyarrow as pa
import pytest
import torch

from rlhf_cluster.experience.records import (
    SAMPLE_SCHEMA,
    Rollout,
    ScoredSample,
    TrainBatch,
    samples_to_table,
    spans_version,
    table_to_samples,
)


def _sample(sid="s0", prompt=(1, 2, 3), response=(4, 5), version=0, reward=0.5, components=None, **kw):
    n = len(response)
    fields = dict(
        sample_id=sid,
        prompt_id="p0",
        group_id="g0",
        prompt_ids=list(prompt),
        response_ids=list(response),
        rollout_logprobs=[-0.5 - i for i in range(n)],
        policy_version=version,
        finish_reason="stop",
        reward=reward,
        reward_components={"correct": 1.0, "digits": 0.25} if components is None else components,
        ref_logprobs=[-0.25 - i for i in range(n)],
        advantages=[0.75] * n,
    )
    fields.update(kw)
    return ScoredSample(**fields)


def test_schema_matches_contract():
    assert SAMPLE_SCHEMA.names == [
        "sample_id",
        "prompt_id",
        "group_id",
        "prompt_ids",
        "response_ids",
        "rollout_logprobs",
        "policy_version",
        "finish_reason",
        "reward",
        "reward_components",
        "ref_logprobs",
        "advantages",
        "created_at",
        "policy_versions",
        "rolled_back_steps",
        "loss_mask",
        "routed_experts",
        "images",
    ]
    assert SAMPLE_SCHEMA.field("images").type == pa.list_(pa.binary())
    assert SAMPLE_SCHEMA.field("rolled_back_steps").type == pa.int32()
    assert SAMPLE_SCHEMA.field("loss_mask").type == pa.list_(pa.int8())
    assert SAMPLE_SCHEMA.field("prompt_ids").type == pa.list_(pa.int32())
    assert SAMPLE_SCHEMA.field("rollout_logprobs").type == pa.list_(pa.float32())
    assert SAMPLE_SCHEMA.field("policy_version").type == pa.int64()
    assert SAMPLE_SCHEMA.field("reward").type == pa.float32()
    assert SAMPLE_SCHEMA.field("reward_components").type == pa.map_(pa.string(), pa.float32())
    assert SAMPLE_SCHEMA.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert SAMPLE_SCHEMA.field("policy_versions").type == pa.list_(
        pa.struct([pa.field("start", pa.int32(), nullable=False), pa.field("version", pa.int64(), nullable=False)])
    )
    assert [f.name for f in SAMPLE_SCHEMA if f.nullable] == ["routed_experts"]  # null: a dense model


def test_version_spans_default_and_round_trip():
    plain = _sample(response=(4, 5, 6), version=3)
    assert plain.policy_versions == [(0, 3)] and not plain.spans_versions
    spanning = _sample(sid="s1", response=(4, 5, 6, 7), version=2, policy_versions=[(0, 2), (3, 4)])
    assert spanning.spans_versions
    assert [spans_version(spanning.policy_versions, t) for t in range(4)] == [2, 2, 2, 4]
    back = table_to_samples(samples_to_table([plain, spanning]))
    assert [s.policy_versions for s in back] == [[(0, 3)], [(0, 2), (3, 4)]]


def test_rolled_back_steps_round_trip_and_files_from_before_the_field_read_as_zero():
    rolled = _sample(version=5, rolled_back_steps=2)
    assert table_to_samples(samples_to_table([rolled]))[0].rolled_back_steps == 2
    old = samples_to_table([_sample(version=4)]).drop_columns(["rolled_back_steps", "loss_mask"])  # a buffer of before
    back = table_to_samples(old)[0]
    assert (back.rolled_back_steps, back.staleness(6)) == (0, 2)


def test_images_round_trip_into_the_train_batch_and_files_from_before_the_field_read_as_none():
    png = (b"\x89PNG first", b"\x89PNG second")
    seen, text = _sample("s0", images=png), _sample("s1")
    back = table_to_samples(samples_to_table([seen, text]))
    assert [b.images for b in back] == [png, ()]
    assert TrainBatch.from_samples(back).images == [png, ()]
    assert TrainBatch.from_samples([text]).images is None  # no row with an image: no image work at all
    old = samples_to_table([text]).drop_columns(["images"])  # a buffer written before images
    assert table_to_samples(old)[0].images == ()


@pytest.mark.parametrize(
    "spans, problem",
    [
        ([], "must start at token 0"),
        ([(1, 2)], "must start at token 0"),
        ([(0, 1)], "differs from policy_version"),
        ([(0, 2), (2, 2)], "must both increase"),
        ([(0, 2), (0, 3)], "must both increase"),
        ([(0, 2), (3, 3)], "starts at or after the last"),
    ],
)
def test_bad_version_spans_are_refused(spans, problem):
    with pytest.raises(ValueError, match=problem):
        _sample(sid="bad", response=(4, 5, 6), version=2, policy_versions=spans)
    with pytest.raises(ValueError, match="bad"):
        Rollout("bad", "p", "g", [1], [4, 5, 6], [-1.0] * 3, 2, "length", policy_versions=spans)


def test_rollout_length_validation():
    Rollout("s", "p", "g", [1], [2, 3], [-1.0, -2.0], 0, "stop")
    with pytest.raises(ValueError, match="s1"):
        Rollout("s1", "p", "g", [1], [2, 3], [-1.0], 0, "stop")


@pytest.mark.parametrize("name", ["rollout_logprobs", "ref_logprobs", "advantages"])
def test_scored_sample_length_validation(name):
    with pytest.raises(ValueError) as info:
        _sample(sid="bad", **{name: [0.0]})
    assert name in str(info.value)
    assert "bad" in str(info.value)


def test_scored_sample_empty_response_ok():
    s = _sample(response=())
    assert s.response_ids == [] and s.advantages == []


def test_created_at_defaults_to_aware_utc_now():
    before = dt.datetime.now(dt.timezone.utc)
    s = _sample()
    after = dt.datetime.now(dt.timezone.utc)
    assert s.created_at.tzinfo is not None
    assert before <= s.created_at <= after


def test_table_round_trip():
    ts = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc)
    samples = [
        _sample("a", response=(4, 5), version=3, reward=1.5, created_at=ts),
        _sample("b", response=(7,), version=4, reward=-0.25, components={"kl_penalty": -0.125}, created_at=ts),
        _sample("c", response=(), version=4, reward=0.0, components={}, finish_reason="length", created_at=ts),
    ]
    table = samples_to_table(samples)
    assert table.schema.equals(SAMPLE_SCHEMA)
    assert table.num_rows == 3
    back = table_to_samples(table)
    assert [s.sample_id for s in back] == ["a", "b", "c"]
    for orig, got in zip(samples, back):
        assert got.reward_components == orig.reward_components
        assert isinstance(got.reward_components, dict)
        assert got.prompt_ids == orig.prompt_ids
        assert got.response_ids == orig.response_ids
        assert got.rollout_logprobs == orig.rollout_logprobs  # exact in float32
        assert got.ref_logprobs == orig.ref_logprobs
        assert got.advantages == orig.advantages
        assert got.reward == orig.reward
        assert got.policy_version == orig.policy_version
        assert got.finish_reason == orig.finish_reason
        assert got.created_at == orig.created_at
    # and back again gives an identical table
    assert samples_to_table(back).equals(table)


def test_empty_table_round_trip():
    table = samples_to_table([])
    assert table.schema.equals(SAMPLE_SCHEMA) and table.num_rows == 0
    assert table_to_samples(table) == []


def test_table_to_samples_refuses_other_schema():
    table = samples_to_table([_sample()])
    wrong = table.cast(table.schema.set(table.schema.get_field_index("reward"), pa.field("reward", pa.float64(), nullable=False)))
    with pytest.raises(ValueError, match="schema"):
        table_to_samples(wrong)
    with pytest.raises(ValueError, match="schema"):
        table_to_samples(table.drop_columns(["created_at"]))


def test_train_batch_padding_and_masks():
    s1 = _sample("a", prompt=(1, 2, 3), response=(4, 5), version=2)
    s2 = _sample("b", prompt=(9,), response=(6, 7, 8, 10), version=5)
    s3 = _sample("c", prompt=(11, 12), response=(), version=1)
    batch = TrainBatch.from_samples([s1, s2, s3], pad_id=99)

    assert batch.input_ids.shape == (3, 5)  # max(3+2, 1+4, 2+0)
    assert batch.input_ids.dtype == torch.long
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [9, 6, 7, 8, 10], [11, 12, 99, 99, 99]]
    assert batch.attention_mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 0, 0, 0]]
    assert batch.prompt_lengths.tolist() == [3, 1, 2]
    assert batch.response_mask.shape == (3, 4)
    assert batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert batch.num_tokens == 6
    assert batch.rollout_logprobs[0].tolist() == [-0.5, -1.5, 0.0, 0.0]
    assert batch.ref_logprobs[1].tolist() == [-0.25, -1.25, -2.25, -3.25]
    assert batch.advantages.tolist() == [[0.75, 0.75, 0, 0], [0.75] * 4, [0, 0, 0, 0]]
    assert batch.policy_versions.tolist() == [2, 5, 1]
    assert batch.sample_ids == ["a", "b", "c"]
    # response tokens sit right after the prompt in input_ids
    for i, s in enumerate([s1, s2, s3]):
        p, n = int(batch.prompt_lengths[i]), len(s.response_ids)
        assert batch.input_ids[i, p : p + n].tolist() == s.response_ids


def test_train_batch_all_empty_responses_has_one_column():
    batch = TrainBatch.from_samples([_sample(response=())])
    assert batch.response_mask.shape == (1, 1)
    assert batch.num_tokens == 0


def test_train_batch_needs_samples():
    with pytest.raises(ValueError):
        TrainBatch.from_samples([])
