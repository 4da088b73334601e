import pyarrow as pa
import pytest

from rlhf_cluster.experience.buffer import BufferFullError, ExperienceBuffer
from rlhf_cluster.experience.records import SAMPLE_SCHEMA, ScoredSample


def _group(gid: str, version: int, n: int = 4, start: int = 0) -> list[ScoredSample]:
    return [
        ScoredSample(
            sample_id=f"{gid}-{i}",
            prompt_id=f"p-{gid}",
            group_id=gid,
            prompt_ids=[1, 2],
            response_ids=[3, 4, 5],
            rollout_logprobs=[-1.0, -2.0, -3.0],
            policy_version=version,
            finish_reason="stop",
            reward=float(i),
            reward_components={"correct": float(i % 2)},
            ref_logprobs=[-1.5, -2.5, -3.5],
            advantages=[0.5] * 3,
        )
        for i in range(start, start + n)
    ]


def test_add_group_counts():
    buf = ExperienceBuffer(capacity=16)
    assert buf.add_group(_group("g0", 0)) == 4
    assert buf.add_group(_group("g1", 0)) == 4
    assert buf.depth == 8
    assert buf.added_total == 8
    assert buf.ready_groups() == 2
    assert buf.dropped["duplicate"] == 0


def test_duplicate_ids_refused_and_counted():
    buf = ExperienceBuffer(capacity=16)
    buf.add_group(_group("g0", 0))
    assert buf.add_group(_group("g0", 0)) == 0
    assert buf.dropped["duplicate"] == 4
    assert buf.depth == 4
    # partial overlap: only the new ones are added
    assert buf.add_group(_group("g0", 0, n=6)) == 2
    assert buf.dropped["duplicate"] == 8
    assert buf.depth == 6


def test_duplicates_refused_after_take():
    buf = ExperienceBuffer(capacity=16)
    buf.add_group(_group("g0", 0))
    assert buf.take(1, 0) is not None
    assert buf.add_group(_group("g0", 0)) == 0
    assert buf.dropped["duplicate"] == 4
    assert buf.depth == 0


def test_duplicate_ids_within_one_group_refused():
    buf = ExperienceBuffer(capacity=16)
    g = _group("g0", 0, n=2)
    assert buf.add_group(g + [g[0]]) == 2
    assert buf.dropped["duplicate"] == 1
    assert buf.depth == 2


def test_capacity_exceeded_raises_and_keeps_state():
    buf = ExperienceBuffer(capacity=6)
    buf.add_group(_group("g0", 0))
    with pytest.raises(BufferFullError):
        buf.add_group(_group("g1", 0))
    assert buf.depth == 4
    assert buf.ready_groups() == 1
    # the refused group was not marked seen: it can be added once there is room
    buf.take(1, 0)
    assert buf.add_group(_group("g1", 0)) == 4


def test_capacity_exactly_full_is_ok():
    buf = ExperienceBuffer(capacity=8)
    buf.add_group(_group("g0", 0))
    buf.add_group(_group("g1", 0))
    assert buf.depth == 8


def test_take_returns_none_when_not_enough():
    buf = ExperienceBuffer(capacity=32)
    buf.add_group(_group("g0", 0))
    assert buf.take(2, 0) is None
    assert buf.depth == 4  # nothing consumed
    buf.add_group(_group("g1", 0))
    out = buf.take(2, 0)
    assert out is not None and len(out) == 8
    assert buf.depth == 0
    assert buf.taken_total == 8


def test_take_drops_stale_and_counts():
    buf = ExperienceBuffer(capacity=32)
    buf.add_group(_group("old", 0))
    buf.add_group(_group("mid", 1))
    buf.add_group(_group("new", 2))
    out = buf.take(1, min_version=1)
    assert {s.group_id for s in out} == {"mid"}
    assert buf.dropped["stale"] == 4
    assert buf.depth == 4
    assert all(s.policy_version >= 1 for s in out)


def test_take_none_still_drops_stale():
    buf = ExperienceBuffer(capacity=32)
    buf.add_group(_group("old", 0))
    buf.add_group(_group("new", 3))
    assert buf.take(2, min_version=2) is None
    assert buf.dropped["stale"] == 4
    assert buf.ready_groups() == 1


def test_group_with_mixed_versions_uses_oldest():
    buf = ExperienceBuffer(capacity=32)
    g = _group("g", 2)
    g[1].policy_version = 0  # a rollout that spanned a weight update
    buf.add_group(g)
    assert buf.take(1, min_version=1) is None
    assert buf.dropped["stale"] == 4


def test_take_oldest_version_first_whole_groups():
    buf = ExperienceBuffer(capacity=64)
    buf.add_group(_group("v3", 3))
    buf.add_group(_group("v1a", 1))
    buf.add_group(_group("v2", 2))
    buf.add_group(_group("v1b", 1))
    out = buf.take(3, min_version=0)
    gids = [s.group_id for s in out]
    assert gids == ["v1a"] * 4 + ["v1b"] * 4 + ["v2"] * 4
    left = buf.take(1, 0)
    assert [s.group_id for s in left] == ["v3"] * 4
    assert buf.depth == 0 and buf.ready_groups() == 0


def test_save_load_round_trip(tmp_path):
    buf = ExperienceBuffer(capacity=32)
    buf.add_group(_group("g0", 0))
    buf.add_group(_group("g1", 1, n=3))
    path = buf.save(tmp_path / "sub" / "buffer.arrow")
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["buffer.arrow"]  # no temp file left

    with pa.memory_map(str(path)) as src:
        table = pa.ipc.open_file(src).read_all()
    assert table.schema.equals(SAMPLE_SCHEMA)
    assert table.num_rows == 7

    fresh = ExperienceBuffer(capacity=32)
    assert fresh.load(path) == 7
    assert fresh.depth == 7
    assert fresh.ready_groups() == 2
    out = fresh.take(2, 0)
    orig = _group("g0", 0) + _group("g1", 1, n=3)
    assert [s.sample_id for s in out] == [s.sample_id for s in orig]
    assert [s.reward_components for s in out] == [s.reward_components for s in orig]
    assert [s.advantages for s in out] == [s.advantages for s in orig]


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "buffer.arrow"
    buf = ExperienceBuffer(capacity=32)
    buf.add_group(_group("g0", 0))
    buf.save(path)
    buf.add_group(_group("g1", 0))
    buf.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["buffer.arrow"]
    again = ExperienceBuffer(capacity=32)
    assert again.load(path) == 8


def test_loaded_duplicates_refused(tmp_path):
    buf = ExperienceBuffer(capacity=32)
    buf.add_group(_group("g0", 0))
    path = buf.save(tmp_path / "b.arrow")
    assert buf.load(path) == 0
    assert buf.dropped["duplicate"] == 4
    assert buf.depth == 4
    other = ExperienceBuffer(capacity=32)
    assert other.load(path) == 4
    assert other.load(path) == 0
    assert other.dropped["duplicate"] == 4


def test_save_empty_buffer(tmp_path):
    path = ExperienceBuffer(capacity=4).save(tmp_path / "empty.arrow")
    assert ExperienceBuffer(capacity=4).load(path) == 0
