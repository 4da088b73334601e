"""Admission control, the job state a checkpoint captures, and the one batch finalisation, without Ray."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rlhf_cluster.experience.admission import Admission
from rlhf_cluster.run.checkpoint import CheckpointStore
from rlhf_cluster.config import AlgorithmConfig, JobConfig
from rlhf_cluster.data.prompts import Prompt, PromptSource
from rlhf_cluster.experience.build import build_group, finalize_batch
from rlhf_cluster.run.job_state import JobState, kept_samples, min_group_size, roll_back
from rlhf_cluster.telemetry.liveness import NoProgressError, ProgressWatchdog
from rlhf_cluster.run.scored_log import ScoredLog
from rlhf_cluster.experience.records import Rollout, ScoredSample
from rlhf_cluster.run.run_dir import RunDir

PROMPTS = [Prompt(f"p{i}", f"{i}+1=", str(i + 1)) for i in range(10)]


def _cfg(tmp_path, **sections) -> JobConfig:
    raw = {"run_dir": str(tmp_path / "run"),
           "train": {"prompts_per_step": 2, "max_staleness": 1, "total_steps": 4, "progress": False},
           "generation": {"mode": "streaming", "max_num_seqs": 8, "sampling": {"n": 2}}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return JobConfig.model_validate(raw)


def _checkpoint(state: JobState, tmp_path, step: int):
    """`state` saved as the checkpoint of `step` (weight version step + 1) in a store under tmp_path."""
    store = CheckpointStore(tmp_path / "ckpt")
    tmp = store.begin(step)
    state.save(step, tmp)
    return store.finalize(tmp, step, step + 1)


def _resumed(cfg: JobConfig, ckpt) -> JobState:
    """A fresh job state of `cfg`, loaded from `ckpt`."""
    state = JobState(cfg, PROMPTS)
    state.load(ckpt)
    return state


def _group(gid: str, version: int, rewards=(0.0, 1.0), finish="stop") -> list[ScoredSample]:
    return [
        ScoredSample(sample_id=f"{gid}-{i}", prompt_id=gid, group_id=gid, prompt_ids=[1, 2], response_ids=[3, 4, 5],
                     rollout_logprobs=[-1.0, -2.0, -3.0], policy_version=version, finish_reason=finish, reward=r,
                     reward_components={}, ref_logprobs=[-1.1, -2.1, -3.1], advantages=[r - 0.5] * 3)
        for i, r in enumerate(rewards)
    ]


def test_admission_runs_ahead_by_at_most_max_staleness(tmp_path):
    cfg = _cfg(tmp_path)
    adm = Admission(cfg.train, cfg.generation, PromptSource(PROMPTS, seed=0))
    # Version 0, max_staleness 1: (0 + 1 + 1) * 2 groups may start, one per streaming request.
    assert adm.allowance(0) == 4
    assert adm.requests_per_worker() == 4  # max_num_seqs 8 // n 2
    keys = [adm.admit(0)[0] for _ in range(4)]
    assert adm.allowance(0) == 0 and not adm.may_start(0, 0, 1)
    with pytest.raises(RuntimeError, match="allowance"):
        adm.admit(0)
    assert adm.allowance(1) == 2  # a published version frees one step's groups
    adm.give_back(1)  # a dropped group is started again
    assert adm.allowance(0) == 1
    assert not adm.may_start(1, requests_in_flight=4, workers=1)  # the worker's requests are full
    adm.buffered(keys[0])
    assert len(adm.in_flight) == 3


def test_admission_state_returns_unbuffered_prompts(tmp_path):
    cfg = _cfg(tmp_path)
    adm = Admission(cfg.train, cfg.generation, PromptSource(PROMPTS, seed=3))
    taken = [adm.admit(0) for _ in range(3)]
    adm.buffered(taken[0][0])
    state = adm.state_dict()
    again = Admission(cfg.train, cfg.generation, PromptSource(PROMPTS, seed=3))
    again.load_state_dict(state, groups_done=1)
    # The two prompts in flight come first, then the source continues where it was.
    replay = [again.admit(5)[1][0] for _ in range(3)]
    assert replay[:2] == [taken[1][1][0], taken[2][1][0]]
    assert replay[2] == adm.admit(5)[1][0]
    assert again.started == 4


def test_pending_prompts_come_back_whole_from_a_checkpoint(tmp_path):
    """A checkpoint's state keeps a pending prompt's text fields only (JSON); on resume the source's
    own prompt is taken, with its images, chat messages and source, unless the prompt changed."""
    cfg = _cfg(tmp_path)
    rich = [Prompt(f"p{i}", f"{i}+1=", str(i + 1), token_ids=(5, i), messages=({"role": "user", "content": "x"},),
                   source="set-a", images=(b"\x89PNG-" + bytes([i]),)) for i in range(10)]  # fmt: skip
    adm = Admission(cfg.train, cfg.generation, PromptSource(rich, seed=3))
    taken = [adm.admit(0)[1][0] for _ in range(2)]
    state = adm.state_dict()
    again = Admission(cfg.train, cfg.generation, PromptSource(rich, seed=3))
    again.load_state_dict(state, groups_done=0)
    assert [again.admit(5)[1][0] for _ in range(2)] == taken  # whole: images, messages, source
    changed = [Prompt(p.prompt_id, p.text + " ", p.answer, p.token_ids, images=p.images) for p in rich]
    other = Admission(cfg.train, cfg.generation, PromptSource(changed, seed=3))
    other.load_state_dict(state, groups_done=0)
    kept = other.admit(5)[1][0]
    assert (kept.text, kept.images) == (taken[0].text, ())  # the checkpoint's prompt, not a changed file's


def test_dynamic_sampling_drops_a_group_without_signal_and_gives_it_back(tmp_path):
    state = JobState(_cfg(tmp_path, algorithm={"shaping": {"dynamic_sampling": True}}), PROMPTS)
    state.admission.admit(0)
    assert state.add_group(_group("g0", 0, rewards=(1.0, 1.0)), {"zero_signal": 1.0}, "gen0") == "zero_signal"
    assert state.dropped["zero_signal"] == 2 and state.admission.given_back == 1 and state.buffer.depth == 0
    assert state.add_group(_group("g1", 0), {"zero_signal": 0.0}, "gen0") is None
    assert state.worker_of == {"g1-0": "gen0", "g1-1": "gen0"}


@pytest.mark.parametrize("broken", ["marked", "nan", "inf"])
def test_a_group_with_a_failed_or_non_finite_reward_is_dropped_whole(tmp_path, broken):
    state = JobState(_cfg(tmp_path), PROMPTS)
    state.admission.admit(0)
    group = _group("g0", 0)
    if broken == "marked":  # the reward function failed on this sample (on_error: drop)
        group[1].reward_components["reward_failed"] = 1.0
    else:  # e.g. a reward model's score
        group[1].reward = float(broken)
    assert state.add_group(group, {"zero_signal": 0.0}, "gen0") == "reward_failed"
    assert state.dropped == {"zero_signal": 0, "reward_failed": 2}
    assert state.buffer.depth == 0 and state.admission.given_back == 1 and state.worker_of == {}
    assert state.counters()["dropped_reward_failed"] == 2


def test_take_drops_stale_groups_and_frees_their_admission(tmp_path):
    state = JobState(_cfg(tmp_path), PROMPTS)
    for gid, version in (("old", 0), ("a", 2), ("b", 2)):
        state.add_group(_group(gid, version), {"zero_signal": 0.0}, "gen0")
    samples, dropped = state.take(step=2)  # min version 2 - 1 = 1: "old" is stale
    assert dropped == 2 and state.admission.given_back == 1
    assert {s.group_id for s in samples} == {"a", "b"}
    assert state.take(step=2) == (None, 0)


def test_job_state_round_trips_through_a_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, algorithm={"kl": {"controller": "adaptive", "coef": 0.1, "target": 1.0}})
    state = JobState(cfg, PROMPTS)
    for _ in range(3):
        state.admission.admit(0)
    state.add_group(_group("g0", 0), {"zero_signal": 0.0}, "gen0")
    state.kl.update(3.0, 4)
    ckpt = _checkpoint(state, tmp_path, 1)
    restored = _resumed(cfg, ckpt)
    assert restored.start_step == 2
    assert restored.kl.value == state.kl.value != 0.1
    assert restored.buffer.depth == state.buffer.depth == 2
    assert restored.admission.started == 2 * 2 + 1  # two steps' groups done + one buffered
    assert len(restored.admission.pending) == 3
    assert (ckpt.path / RunDir.DRIVER_STATE).is_file()


def test_finalize_batch_masks_overlong_and_leaves_buffered_samples_untouched(tmp_path):
    cfg = _cfg(tmp_path, algorithm={"preset": "reinforce_pp", "shaping": {"overlong_filter": True}}).algorithm
    samples = _group("g0", 0) + _group("g1", 0, rewards=(0.5, 2.0), finish="length")
    before = [list(s.advantages) for s in samples]
    batch, metrics = finalize_batch(samples, cfg, kl_coef=0.0)
    assert batch.in_loss == [True, True, False, False] and metrics["samples_in_loss"] == 2
    assert [s.advantages for s in samples] == before  # the buffer's copies are final as scored
    assert [s.advantages for s in batch.samples] != before  # REINFORCE++ whitens over the whole batch
    assert [len(share.input_ids) for share in batch.policy_shares(2)] == [2, 2]
    with pytest.raises(ValueError, match="critic values"):
        finalize_batch(samples, cfg, kl_coef=0.0, values=[[0.0] * 3] * 4)


def test_finalize_batch_gae_needs_values_and_gives_critic_targets(tmp_path):
    cfg = AlgorithmConfig(advantage="gae", gamma=1.0, lam=1.0, kl={"placement": "reward", "coef": 0.0})
    samples = _group("g0", 0)
    with pytest.raises(ValueError, match="critic values"):
        finalize_batch(samples, cfg, kl_coef=0.0)
    values = [[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]]
    batch, metrics = finalize_batch(samples, cfg, kl_coef=0.0, values=values)
    # gamma = lam = 1, no KL: every token's return is the sequence reward.
    assert batch.returns[1] == pytest.approx([1.0, 1.0, 1.0])
    assert batch.old_values == values
    assert "advantage/return_mean" in metrics
    shares = batch.critic_shares(2)
    assert shares[0].returns is not None and shares[1].old_values is not None


def test_a_resume_with_changed_settings_applies_them_over_the_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, algorithm={"kl": {"controller": "adaptive", "coef": 0.1, "target": 1.0}})
    state = JobState(cfg, PROMPTS)
    state.kl.update(3.0, 400)  # the controller moved the coefficient away from 0.1
    moved = state.kl.value
    ckpt = _checkpoint(state, tmp_path, 0)

    same = _resumed(cfg, ckpt)
    assert same.overrides == {} and same.kl.value == moved  # unchanged settings: the checkpoint's state

    changed_cfg = _cfg(tmp_path, learner={"lr": 5e-4}, algorithm={"kl": {"controller": "adaptive", "coef": 0.3, "target": 2.0}})
    changed = _resumed(changed_cfg, ckpt)
    assert changed.overrides == {"learner.lr": (cfg.learner.lr, 5e-4), "algorithm.kl.coef": (0.1, 0.3),
                                 "algorithm.kl.target": (1.0, 2.0)}
    assert (changed.kl.value, changed.kl.target) == (0.3, 2.0)

    target_only = _resumed(_cfg(tmp_path, algorithm={"kl": {"controller": "adaptive", "coef": 0.1, "target": 2.0}}), ckpt)
    assert (target_only.kl.value, target_only.kl.target) == (moved, 2.0)  # the adapted coefficient is kept


def test_every_group_scored_after_a_checkpoint_is_reused_on_resume(tmp_path):
    cfg = _cfg(tmp_path, algorithm={"shaping": {"dynamic_sampling": True}})
    state = JobState(cfg, PROMPTS)
    requests = [state.admission.admit(1) for _ in range(5)]  # five groups in flight
    admitted = [prompts[0] for _, prompts in requests]
    state.add_group(_group(admitted[0].prompt_id, 0), {"zero_signal": 0.0}, "gen0")  # in the checkpoint's buffer
    state.admission.buffered(requests[0][0])
    ckpt = _checkpoint(state, tmp_path, 0)  # version 1
    # After the checkpoint: a group from version 1, one from version 2 (weights the rollback
    # abandons), one dropped for no signal (its drop is reused too), then the job is killed.
    state.add_group(_group(admitted[1].prompt_id, 1), {"zero_signal": 0.0}, "gen0")
    state.add_group(_group(admitted[2].prompt_id, 2), {"zero_signal": 0.0}, "gen0")
    state.add_group(_group(admitted[3].prompt_id, 1, rewards=(1.0, 1.0)), {"zero_signal": 1.0}, "gen0")
    state.log.flush()
    state.add_group(_group(admitted[4].prompt_id, 1), {"zero_signal": 0.0}, "gen0")  # never flushed: lost

    resumed = _resumed(cfg, ckpt)
    assert resumed.recovered == {"reused": 3, "rolled_back": 1, "stale": 0}
    assert resumed.dropped["zero_signal"] == 2
    groups = {}
    for s in resumed.buffer.take(resumed.buffer.ready_groups(), min_version=-10):
        groups.setdefault(s.group_id, s)
    assert set(groups) == {admitted[i].prompt_id for i in (0, 1, 2)}
    # The version-2 group keeps its versions; the step the rollback abandoned counts twice in its
    # staleness: one back to version 1, which the resumed learner holds too, one per step after.
    orphan = groups[admitted[2].prompt_id]
    assert (orphan.policy_version, orphan.rolled_back_steps, orphan.staleness(1), orphan.staleness(2)) == (2, 1, 1, 2)
    assert [groups[admitted[i].prompt_id].staleness(1) for i in (0, 1)] == [1, 0]
    # Only the lost group's prompt is generated again.
    again = [resumed.admission.admit(5)[1][0].prompt_id for _ in range(2)]
    assert again[0] == admitted[4].prompt_id
    assert not {admitted[i].prompt_id for i in (1, 2, 3)} & set(again)
    # The reused groups stay in the log as scored; the resumed job numbers its own after them. A
    # second resume from the same checkpoint (the first died before its next one) finds them all
    # again, those it scored since included, and rolls them back as the first did.
    seq = ckpt.driver_state()["scored_seq"]
    assert resumed.log.next_seq == seq + 3
    resumed.add_group(_group(admitted[4].prompt_id, 1), {"zero_signal": 0.0}, "gen0")
    resumed.log.flush()
    logged = resumed.log.since(seq)
    assert [s[0].group_id for _, s in logged] == [admitted[i].prompt_id for i in (1, 2, 3, 4)]
    assert [s[0].rolled_back_steps for _, s in logged] == [0, 0, 0, 0]
    again = _resumed(cfg, ckpt)
    assert again.recovered == {"reused": 4, "rolled_back": 1, "stale": 0}


def test_a_resume_keeps_the_scored_log_until_the_next_checkpoint(tmp_path):
    """Found by the soak: a resume cut the log at the checkpoint and kept the reused groups in
    memory until its next flush; a resume that died before then (it failed to start) left the
    next one fewer groups to reuse, and their prompts were generated again."""
    cfg = _cfg(tmp_path)
    state = JobState(cfg, PROMPTS)
    ckpt = _checkpoint(state, tmp_path, 0)
    for i in range(3):
        state.add_group(_group(f"g{i}", 1), {"zero_signal": 0.0}, "gen0")
    state.log.flush()
    for _ in range(2):  # each resume dies before it checkpoints: nothing of its own is flushed
        resumed = _resumed(cfg, ckpt)
        assert resumed.recovered["reused"] == 3 and resumed.buffer.ready_groups() == 3
    assert [s[0].group_id for _, s in ScoredLog(Path(cfg.run_dir) / RunDir.SCORED_LOG).since(0)] == ["g0", "g1", "g2"]


def test_a_resume_after_a_long_stretch_without_checkpoints_drops_what_is_stale_before_the_buffer(tmp_path):
    """Found by the soak: checkpoints failed on a full disk for 50 steps, the learner died, and
    the resume reused every group scored since the last checkpoint: 800 groups into a buffer of
    512 (BufferFullError, the job could not start). Groups too stale for the resumed learner's
    first step are counted as dropped stale, as `take` would, and only the rest is buffered."""
    cfg = _cfg(tmp_path, buffer={"capacity": 8})  # 4 groups of 2
    state = JobState(cfg, PROMPTS)
    ckpt = _checkpoint(state, tmp_path, 0)  # version 1: the resumed learner's first step is 1
    versions = [1, 1, 2, 2, 3, 3, 4, 5, 6]  # the steps after the checkpoint that no checkpoint kept
    for i, version in enumerate(versions):  # scored, buffered and trained on by those steps
        state.log.append(_group(f"g{i}", version), "buffered")
    state.log.flush()
    resumed = _resumed(cfg, ckpt)
    # Rolled back to version 1, a group of version v is as stale as version 2 - v (2 * (v - 1)
    # steps back from v); step 1 admits version 0 and up (max_staleness 1).
    assert resumed.recovered == {"reused": 9, "rolled_back": 7, "stale": 5}
    assert resumed.buffer.ready_groups() == 4 and resumed.counters()["dropped_stale"] == 5 * 2
    assert {s.group_id for s in resumed.buffer.take(4, min_version=0)} == {"g0", "g1", "g2", "g3"}
    # No reused prompt, stale or not, is generated again.
    assert resumed.admission.skipping == {f"g{i}": 1 for i in range(9)}


def test_rolling_back_again_counts_every_abandoned_step_once():
    sample = _group("p", 5)[0]
    once = roll_back(sample, 3)  # versions 4 and 5 abandoned
    assert (once.rolled_back_steps, once.effective_version, once.staleness(3)) == (2, 1, 2)
    assert roll_back(once, 4).rolled_back_steps == 2  # a later rollback that keeps version 3 changes nothing
    twice = roll_back(once, 1)  # back to version 1: 2, 3, 4, 5 are on the abandoned path
    assert (twice.rolled_back_steps, twice.staleness(1)) == (4, 4)
    assert roll_back(_group("q", 1)[0], 3).rolled_back_steps == 0  # weights the learner still descends from
    # A response sampled by version 3, then 5 (loaded in flight), rolled back to 4: its version-5
    # tokens are one step past 4 on the abandoned path (staleness 1 at learner version 4, 2 at 5),
    # its version-3 tokens one step behind (1, then 2); at 4 and 5 they tie. Rolled back to 3, the
    # version-5 tokens are the stalest (2 + 0, then 2 + 1).
    straddling = dataclasses.replace(sample, policy_version=3, policy_versions=[(0, 3), (1, 5)])
    assert [roll_back(straddling, 4).staleness(v) for v in (4, 5)] == [1, 2]
    assert [roll_back(straddling, 3).staleness(v) for v in (3, 4)] == [2, 3]


def test_the_scored_log_is_durable_per_flush_and_compacts_whole_segments(tmp_path):
    log = ScoredLog(tmp_path / "scored")
    log.append(_group("a", 0), "buffered")
    log.append(_group("b", 0), "zero_signal")
    log.flush()
    log.append(_group("c", 1), "buffered")
    log.flush()
    log.flush()  # nothing pending: no empty segment
    assert len(list((tmp_path / "scored").iterdir())) == 2
    reread = ScoredLog(tmp_path / "scored")  # e.g. after a kill
    assert [(fate, s[0].group_id) for fate, s in reread.since(1)] == [("zero_signal", "b"), ("buffered", "c")]
    reread.compact(2)  # the first segment holds only groups 0 and 1
    assert [s[0].group_id for _, s in reread.since(0)] == ["c"]
    log.append(_group("d", 1), "buffered")
    log.append(_group("e", 1), "buffered")
    log.flush()  # one segment: groups 3 and 4
    with pytest.raises(ValueError, match="straddles"):
        log.truncate(4)


# ---- issue 34: a failed reward drops its sample, not its group; no silent livelock -------------

def _scored_group(cfg: JobConfig, gid: str, failed: set[int], n: int = 8, version: int = 0):
    """The rollout path without Ray: score n samples (those in `failed` marked as on_error: drop
    marks them), keep what `kept_samples` keeps, build the group over it."""
    rollouts = [Rollout(f"{gid}-{i}", gid, gid, [1, 2], [3, 4], [-0.5, -0.5], version, "stop") for i in range(n)]
    scores = [(0.0, {"reward_failed": 1.0}) if i in failed else (float(i % 2), {"reward_failed": 0.0}) for i in range(n)]
    kept = kept_samples(scores, min_group_size(cfg))
    samples, metrics = build_group([rollouts[k] for k in kept], [scores[k] for k in kept], None, cfg.algorithm,
                                   kl_coef=0.0, max_new_tokens=4)
    return samples, metrics, n - len(kept)


def test_a_failed_reward_drops_only_its_sample_and_the_group_keeps_the_rest(tmp_path):
    cfg = _cfg(tmp_path, generation={"sampling": {"n": 8}})
    state = JobState(cfg, PROMPTS)
    state.admission.admit(0)
    samples, metrics, failed = _scored_group(cfg, "g0", failed={0, 4, 5})  # ~1 in 3, as in the issue
    assert failed == 3 and {s.sample_id for s in samples} == {"g0-1", "g0-2", "g0-3", "g0-6", "g0-7"}
    # GRPO's baseline is over the 5 that kept a reward: their advantages sum to 0, none is a failure's 0.0.
    assert abs(sum(s.advantages[0] for s in samples)) < 1e-6
    assert state.add_group(samples, metrics, "gen0", failed) is None
    assert state.buffer.depth == 5 and state.admission.given_back == 0
    assert state.dropped["reward_failed"] == 3 and state.counters()["dropped_reward_failed"] == 3


def test_samples_left_out_after_a_checkpoint_are_still_counted_after_a_resume(tmp_path):
    """Found by a clean clone's kill-and-resume test (a VLM's sampled placeholders fail their
    samples): the log held a reused group's kept samples but not how many it left out, so a resume
    forgot those drops and the run's samples no longer added up (taken = trained + buffered + dropped)."""
    cfg = _cfg(tmp_path, generation={"sampling": {"n": 8}})
    state = JobState(cfg, PROMPTS)
    state.admission.admit(0)
    for gid, failed in (("before", {1}), ("after", {0, 4, 5})):  # the first in the checkpoint, the second after it
        samples, metrics, left_out = _scored_group(cfg, gid, failed)
        state.add_group(samples, metrics, "gen0", left_out)
        if gid == "before":
            ckpt = _checkpoint(state, tmp_path, 0)
    state.log.flush()
    resumed = _resumed(cfg, ckpt)
    assert resumed.recovered["reused"] == 1 and resumed.buffer.depth == 7 + 5
    assert resumed.dropped["reward_failed"] == 1 + 3


def test_a_scored_log_written_before_failed_counts_reads_as_none_failed(tmp_path):
    import json

    import pyarrow as pa

    log = ScoredLog(tmp_path / "scored")
    log.append(_group("g0", 0), "buffered", failed=2)
    log.flush()
    (segment,) = (tmp_path / "scored").glob("seg-*.arrow")
    table = pa.ipc.open_file(pa.BufferReader(segment.read_bytes())).read_all()  # not mapped: rewritten below
    groups = json.loads(table.schema.metadata[b"groups"])
    assert groups == [[0, "buffered", "g0", 2]]
    old = table.replace_schema_metadata({"groups": json.dumps([g[:3] for g in groups])})  # the format before
    with pa.ipc.new_file(str(segment), old.schema) as writer:
        writer.write_table(old)
    assert [(g.fate, len(g.samples), g.failed) for g in ScoredLog(tmp_path / "scored").resume_from(0)] == [
        ("buffered", 2, 0)
    ]


def test_a_group_left_too_small_for_its_advantage_is_dropped_whole(tmp_path):
    cfg = _cfg(tmp_path, generation={"sampling": {"n": 8}})
    state = JobState(cfg, PROMPTS)
    state.admission.admit(0)
    samples, metrics, failed = _scored_group(cfg, "g0", failed=set(range(7)))  # one left: no GRPO baseline
    assert failed == 0 and len(samples) == 8  # built whole, so the drop is logged and counted as one group
    assert state.add_group(samples, metrics, "gen0", failed) == "reward_failed"
    assert state.buffer.depth == 0 and state.dropped["reward_failed"] == 8 and state.admission.given_back == 1


@pytest.mark.parametrize("sections, expected", [
    ({}, 2),  # grpo: a baseline needs another sample
    ({"algorithm": {"advantage": "rloo"}}, 2),
    ({"algorithm": {"advantage": "reinforce_pp"}}, 1),  # whitened over the batch: one sample is enough
    ({"learner": {"world_size": 2, "mini_batches": 4}}, 4),  # 2 groups per step must fill 2 ranks x 4 mini-batches
    ({"learner": {"world_size": 4, "mini_batches": 8}}, 8),  # never more than the group's size
    # a critic group counts too (its config has no mini_batches of its own: the learner's default applies)
    ({"algorithm": {"advantage": "gae"}, "critic": {"world_size": 6}}, 3),
])
def test_min_group_size(tmp_path, sections, expected):
    assert min_group_size(_cfg(tmp_path, generation={"sampling": {"n": 8}}, **sections)) == expected


def test_stale_groups_that_kept_part_of_their_samples_give_their_admission_back(tmp_path):
    cfg = _cfg(tmp_path, generation={"sampling": {"n": 8}})
    state = JobState(cfg, PROMPTS)
    for gid, version in (("old", 0), ("a", 2), ("b", 2)):
        samples, metrics, failed = _scored_group(cfg, gid, failed={1, 2, 3}, version=version)
        assert state.add_group(samples, metrics, "gen0", failed) is None
    samples, dropped = state.take(step=2)
    assert dropped == 5 and state.admission.given_back == 1  # one group of 5 samples, not 5 // 8 = 0 groups
    assert len(samples) == 10


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_ends_a_step_loop_whose_groups_are_all_dropped_saying_why(tmp_path):
    cfg = _cfg(tmp_path, generation={"sampling": {"n": 8}}, faults={"progress_timeout_s": 120})
    state = JobState(cfg, PROMPTS)
    clock = _Clock()
    state.watchdog = ProgressWatchdog(cfg.faults.progress_timeout_s, cfg.faults.progress_timeout_factor, clock=clock)
    for i in range(30):  # every group loses 7 of 8 samples: each is dropped, no batch ever forms
        clock.now = 5.0 * i
        state.admission.admit(0)
        samples, metrics, failed = _scored_group(cfg, f"g{i}", failed=set(range(7)))
        assert state.add_group(samples, metrics, "gen0", failed) == "reward_failed"
        if clock.now <= 120:
            assert state.take(step=0) == (None, 0)
    with pytest.raises(NoProgressError) as info:
        state.take(step=0)
    msg = str(info.value)
    assert msg.startswith("no learner step for 145 s (the bound before the first step is faults.progress_timeout_s = 120 s)")
    assert "30 groups dropped (reward_failed)" in msg and "scoring.rewards on_error, max_failure_fraction" in msg
    assert "the buffer holds 0 (0 samples)" in msg


def test_the_watchdog_lets_slow_healthy_steps_and_the_time_between_steps_pass():
    clock = _Clock()
    dog = ProgressWatchdog(3600, 10, clock=clock)
    for step in range(5):  # steps of 500 s, 400 of them waiting for the batch
        clock.now += 100  # training, evaluation, checkpoint: no wait
        dog.waiting()
        clock.now += 400
        assert dog.overdue_s() is None
        dog.progressed()
    assert dog.bound_s() == 3600  # 10 x 500 s, at most the ceiling
    clock.now += 7200  # a long evaluation between steps is not a wait
    dog.waiting()
    clock.now += 3000  # a slow batch: six times the usual, still under the bound
    assert dog.overdue_s() is None
    clock.now += 601
    assert dog.overdue_s() == 3601
    fast = ProgressWatchdog(3600, 10, clock=clock)
    for _ in range(3):  # 1 s steps (2 between 3 batches): the bound is the 600 s floor, not 10 s
        fast.waiting()
        clock.now += 1
        fast.progressed()
    fast.waiting()
    clock.now += 599
    assert fast.overdue_s() is None and fast.bound_s() == 600
    clock.now += 2
    assert fast.overdue_s() == 601 and "faults.progress_timeout_factor 10 x the slowest of the last 2 steps" in fast.explain()
