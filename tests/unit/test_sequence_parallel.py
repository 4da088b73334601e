"""Sequence parallelism (`rlhf_cluster.models.sequence_parallel`): the rows' slicing, shift and
padding; the head-count checks; and, with 2 gloo ranks on the CPU, log-probs and every weight's
gradient of a 4,097-token packed row split over the ranks equal to one rank's whole-row ones."""

from __future__ import annotations

import contextlib
import queue
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.models.chunked_logprobs import scored_positions
from rlhf_cluster.models.packing import PackedRows, plan_packing, prepared_mask
from rlhf_cluster.models.sequence_parallel import (
    check_heads,
    enable_sequence_parallel,
    gather_rows,
    padded_runs,
    plan_shard,
    shard_rows,
    sharded_logprobs,
    sharded_response_logprobs,
)
from rlhf_cluster.models.tiny_model import build_model
from tests.process_groups import join_ranks, one_rank_process_group, spawn_ranks

WORLD = 2
# Three packed sequences, 4,097 tokens: the seam between the ranks' slices (slot 2,049) falls inside
# the second one, and the odd length pads the row's tail by one slot.
LENGTHS = [1800, 1500, 797]
VOCAB = 300
# 4 query heads, 1 key/value head: 2 ranks need the kv head repeated (GQA), 2 query heads per kv head on each.
SHAPE = TinyModelConfig(
    hidden_size=128, num_heads=4, num_kv_heads=1, num_layers=2, intermediate_size=64, max_position_embeddings=4096
)


def _model() -> torch.nn.Module:
    model = build_model(SHAPE, VOCAB, eos_id=1, pad_id=0)  # seeded: the same weights in every process
    model.set_attn_implementation("sdpa")
    return model


def _packed_row(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, position ids, sequence ids) [1, sum(lengths)] of sequences packed one after another."""
    ids = torch.randint(2, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    sequences = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return ids, positions, sequences


def _weights(n: int) -> torch.Tensor:
    """A fixed weight per slot, so the loss's gradient differs token by token."""
    return torch.cos(torch.arange(n, dtype=torch.float32) * 0.37)


def _whole_row(model, ids, positions, sequences) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One rank's reference: the whole row's log-probs (0 where not scored) and weight gradients
    of sum(weights * log-probs), the packed path's block-diagonal causal mask."""
    rows = shard_rows(ids, positions, sequences, 1)
    mask = prepared_mask(sequences[:, :, None] == sequences[:, None, :], "sdpa", torch.float32)
    only = rows.scored.reshape(-1).nonzero().squeeze(1)
    flat = torch.arange(ids.numel()).view(ids.shape)
    with scored_positions(model, flat, rows.targets, only=only) as scored:
        logp, _ = scored.read(model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False).logits)
    (logp[0] * _weights(ids.shape[1])).sum().backward()
    return logp.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _rank(rank: int, port: int, model_path: str, failures) -> None:
    """One of the 2 gloo ranks every two-rank check of this module runs on (a spawned process and
    its imports are most of a check's time): the sharded row, the learner's packed rows, and then
    a learner step (`_learner_step`); rank 0 puts each result in `failures`, in that order."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        _sharded_row(rank, failures)
        _learner_rows(rank, failures)
        metrics, weights = _learner_step(model_path, WORLD, rank)
        if rank == 0:  # as numpy: a tensor would travel by a handle only this process (about to exit) serves
            failures.put(("step", (metrics, {name: w.numpy() for name, w in weights.items()})))
        dist.barrier()
    except BaseException as exc:
        failures.put(("error", f"rank {rank}: {exc!r}\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


def _sharded_row(rank: int, failures) -> None:
    """`sharded_logprobs` of LENGTHS' packed row on every rank equals the whole row on one, gradients summed."""
    ids, positions, sequences = _packed_row(LENGTHS)
    model = _model()
    reference = _whole_row(model, ids, positions, sequences) if rank == 0 else None
    model.zero_grad(set_to_none=True)
    rows = shard_rows(ids, positions, sequences, WORLD)
    layout = rows.layout(None, enable_sequence_parallel(model, WORLD))
    start, stop = rows.bounds(rank)
    logp, _ = sharded_logprobs(model, rows, rank, layout)
    (logp[0] * _weights(rows.input_ids.shape[1])[start:stop]).sum().backward()
    whole = gather_rows(logp.detach(), WORLD)[:, : rows.length]
    grads = {name: p.grad for name, p in model.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad)  # the ranks' partial gradients of the same row add up to the whole row's
    if reference is not None:
        failures.put(("compare", _differences(whole, grads, *reference)))


@pytest.fixture(scope="module")
def two_ranks(tiny_model_path) -> tuple[list, list]:
    """The 2 spawned ranks of `_rank`, run once for the module's two-rank tests: what rank 0 put
    (kind, result) in order, and the processes' exit codes."""
    started = time.monotonic()
    failures, procs = spawn_ranks(_rank, WORLD, tiny_model_path)
    found = []
    while len(found) < 3 and time.monotonic() - started < 300 and any(p.is_alive() for p in procs):
        try:
            found.append(failures.get(timeout=1))
        except queue.Empty:
            continue
    join_ranks(procs)
    while not failures.empty():
        found.append(failures.get())
    return found, [p.exitcode for p in procs]


# The learner's packed path: a right-padded batch of (prompt, response) lengths packed as SDPA packs
# it (rows as wide as the longest sequence: several rows, some holding two sequences).
PAIRS = [(40, 300), (25, 120), (60, 200), (30, 90), (10, 57)]


def _learner_batch() -> tuple[torch.Tensor, PackedRows, int]:
    """(padded ids [B, L], their packing, response length T)."""
    lengths = [p + r for p, r in PAIRS]
    T = max(r for _, r in PAIRS)
    ids = torch.randint(2, VOCAB, (len(PAIRS), max(lengths)), generator=torch.Generator().manual_seed(2))
    packing = plan_packing(lengths, [p for p, _ in PAIRS], ids.shape[1], T, max(lengths))
    return ids, packing, T


def _learner_loss(logp: torch.Tensor) -> torch.Tensor:
    return (logp * _weights(logp.numel()).view(logp.shape)).sum()


def _packed_reference(model, ids, packing) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The packed path on one rank (as `modeling._packed_logprobs` runs it) and its gradients."""
    packed = packing.input_ids(ids)
    mask = prepared_mask(packing.sequence_ids[:, :, None] == packing.sequence_ids[:, None, :], "sdpa", torch.float32)
    with scored_positions(model, packing.positions, packing.targets(packed), only=packing.scored) as scored:
        out = model(input_ids=packed, position_ids=packing.position_ids, attention_mask=mask, use_cache=False)
        logp, _ = scored.read(out.logits)
    _learner_loss(logp).backward()
    return logp.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _learner_rows(rank: int, failures) -> None:
    """`sharded_response_logprobs` on every rank equals the packed path on one, gradients summed."""
    ids, packing, _ = _learner_batch()
    model = _model()
    reference = _packed_reference(model, ids, packing)
    model.zero_grad(set_to_none=True)
    rows = shard_rows(packing.input_ids(ids), packing.position_ids, packing.sequence_ids, WORLD)
    layout = rows.layout(None, enable_sequence_parallel(model, WORLD))
    logp, _ = sharded_response_logprobs(model, rows, plan_shard(packing, WORLD, rank), rank, layout)
    _learner_loss(logp).backward()  # every rank the same loss of the same summed log-probs
    grads = {name: p.grad for name, p in model.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad)
    if rank == 0:
        failures.put(("learner rows", _differences(logp.detach(), grads, *reference)))


def _differences(logp, grads, ref_logp, ref_grads) -> list[str]:
    """Where the sharded results leave the tolerance (see the test's docstring)."""
    out = []
    if not torch.allclose(logp, ref_logp, rtol=1e-5, atol=1e-5):
        out.append(f"log-probs: max difference {(logp - ref_logp).abs().max().item():.3g}")
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        err = (grads[name] - ref).abs().max().item()
        if err > 1e-5 * scale + 1e-8:
            out.append(f"{name}: max difference {err:.3g}, largest gradient {scale:.3g}")
    return out


def test_two_ranks_equal_one_rank_in_logprobs_and_gradients(two_ranks):
    """A 4,097-token row scored at every slot, and the learner's packed rows scored at their
    responses' tokens (`sharded_response_logprobs`). fp32 on both sides. The ranks run the same
    operations on the same numbers except for the order of the sums: a weight's gradient is two
    partial sums over 2,049 tokens each instead of one over 4,097, and each slice's matmuls block
    differently. fp32 rounding of a sum of n terms is at most about n * 6e-8 of the sum of their
    magnitudes, typically sqrt(n) * 6e-8 of it: 1e-5 of the largest gradient entry is 25x what was
    measured (3.8e-7, q_proj), while a real error moves the gradients by a tenth or more of their
    size (measured: a mask ignoring the packed sequences, slices' position ids restarting at 0, a
    rank's gradient left out). The log-probs came out identical (the attention runs the same kernel
    on the same whole-row numbers); 1e-5 absolute of values near -5.7 allows the rounding of a
    different matmul blocking."""
    found, exitcodes = two_ranks
    assert all(code == 0 for code in exitcodes), (found, exitcodes)
    assert [kind for kind, _ in found] == ["compare", "learner rows", "step"], found
    assert found[0][1] == [] and found[1][1] == [], found


def test_rows_are_padded_to_the_ranks_and_shifted_before_they_are_sliced():
    ids = torch.tensor([[10, 11, 12, 20, 21, 22, 23]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    sequences = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    rows = shard_rows(ids, positions, sequences, 3)
    assert rows.width == 3 and rows.length == 7
    assert rows.input_ids.tolist() == [[10, 11, 12, 20, 21, 22, 23, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0]]
    assert rows.sequence_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, -1, -1]]
    # Slot 2 (rank 0's last) predicts slot 3, rank 1's first: across the seam, on the whole row.
    assert rows.targets.tolist() == [[11, 12, 20, 21, 22, 23, 0, 0, 0]]
    # A sequence's last token predicts nothing (the next slot is another sequence or the tail), nor does the tail.
    assert rows.scored.tolist() == [[True, True, False, True, True, True, False, False, False]]
    assert rows.bounds(1) == (3, 6)
    assert rows.local("targets", 1).tolist() == [[21, 22, 23]]
    assert rows.local("position_ids", 2).tolist() == [[3, 0, 0]]


def test_varlen_attention_gets_the_whole_rows_runs_and_no_mask():
    ids = torch.tensor([[10, 11, 12, 20, 21, 22, 23]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    rows = shard_rows(ids, positions, None, 3)
    for attention in ("flash_attention_2", "varlen"):
        layout = rows.layout(None, attention)
        assert layout.mask(torch.float32) is None
        runs = layout.varlen_kwargs()  # the two sequences, then each tail slot (position 0) alone
        assert runs["cu_seq_lens_q"].tolist() == [0, 3, 7, 8, 9] and runs["max_length_q"] == 4
    assert rows.layout(None, "sdpa").mask(torch.float32).shape == (1, 1, 9, 9)


def test_a_row_without_sequence_ids_is_one_sequence():
    rows = shard_rows(torch.tensor([[5, 6, 7, 8]]), torch.arange(4)[None], None, 2)
    assert rows.scored.tolist() == [[True, True, True, False]]
    assert rows.local("input_ids", 1).tolist() == [[7, 8]]


def test_the_shard_plan_is_the_ranks_scored_slots_planned_on_the_host():
    """`plan_shard` on the host gives each rank the slots, targets and scored tokens the forward
    would otherwise find on the device (a boolean index: a host read per forward), and the whole
    padded rows' varlen runs from the packing's."""
    ids, packing, _ = _learner_batch()
    rows = shard_rows(packing.input_ids(ids), packing.position_ids, packing.sequence_ids, 3)
    R, C = packing.position_ids.shape
    row, column = packing.positions // C, packing.positions % C
    covered = torch.zeros(packing.positions.numel(), dtype=torch.long)
    for rank in range(3):
        plan = plan_shard(packing, 3, rank)
        start, stop = rows.bounds(rank)
        here = (column >= start) & (column < stop)
        assert torch.equal(plan.mine, packing.scored[here.reshape(-1)[packing.scored]])
        assert torch.equal(plan.slots[here], (row * rows.width + column - start)[here])
        assert torch.equal(rows.targets.reshape(-1)[plan.targets], rows.targets[row, column])
        covered[plan.mine] += 1
    assert torch.equal(covered[packing.scored], torch.ones(packing.scored.numel(), dtype=torch.long))
    # Two rows of 5 slots (2 + 3 tokens; 3 tokens and a 2-slot tail) padded to 6 for 3 ranks.
    cu, longest = padded_runs(torch.tensor([0, 2, 5, 8, 10], dtype=torch.int32), 2, 5, 6)
    assert cu.tolist() == [0, 2, 5, 6, 9, 11, 12] and cu.dtype == torch.int32 and longest == 3
    assert padded_runs(torch.tensor([0, 3, 6], dtype=torch.int32), 1, 6, 6)[0].tolist() == [0, 3, 6]
    layout = rows.layout(None, "varlen", plan.runs)
    assert layout.varlen_kwargs()["cu_seq_lens_q"] is plan.cu_seqlens  # planned: no read of the device


def test_micro_batches_under_sequence_parallelism_are_packed_with_their_shard_plan():
    from rlhf_cluster.learner.micro_batches import micro_batch
    from tests.batches import ragged_batch

    batch = ragged_batch([(4, 4), (4, 4)], seed=0)  # equal lengths: packing alone would not pay
    assert micro_batch(batch, [0, 1], True, True, torch.device("cpu"), "sdpa").packing is None
    micro = micro_batch(batch, [0, 1], True, True, torch.device("cpu"), "sdpa", (2, 1))
    assert micro.packing is not None and micro.shard is not None
    assert torch.equal(micro.shard.mine, plan_shard(micro.packing, 2, 1).mine)


def test_sdpa_is_refused_on_cuda_naming_the_attentions_that_run():
    with pytest.raises(ValueError, match=r"learner\.attention .*varlen, flash_attention_2, flex_attention"):
        enable_sequence_parallel(_model(), 2, torch.device("cuda"))
    assert enable_sequence_parallel(_model(), 2, torch.device("cpu")) == "sdpa"  # the CPU runs it


def test_a_group_size_that_does_not_divide_the_ranks_is_refused_before_any_group(gloo_group):
    from rlhf_cluster.learner.sequence_groups import sequence_group

    with pytest.raises(ValueError, match=r"learner\.sequence_parallel=2 must divide .* 1 ranks"):
        sequence_group(2)


class _Config:
    def __init__(self, heads: int, kv_heads: int):
        self.num_attention_heads, self.num_key_value_heads = heads, kv_heads


def test_heads_the_ranks_cannot_share_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"learner\.sequence_parallel: 3 ranks .* 4 attention heads and 1 key-value"):
        check_heads(_Config(4, 1), 3)
    with pytest.raises(ValueError, match=r"learner\.sequence_parallel: 3 ranks .* 4 attention heads"):
        enable_sequence_parallel(_model(), 3)


def test_key_value_heads_fewer_than_the_ranks_are_repeated():
    assert check_heads(_Config(4, 4), 2) == 1
    assert check_heads(_Config(4, 1), 2) == 2
    assert check_heads(_Config(8, 2), 8) == 4
    assert check_heads(_Config(12, 2), 4) == 2  # 2 kv heads x 2 copies: one per rank


def test_one_rank_equals_the_packed_path_and_eager_is_refused():
    """No communication at one rank: the registered attention, run on the whole row with the
    layout's mask, gives the packed path's log-probs exactly; so does a forward without a layout."""
    ids, positions, sequences = _packed_row([7, 5, 9])
    model = _model()
    reference, _ = _whole_row(model, ids, positions, sequences)
    rows = shard_rows(ids, positions, sequences, 1)
    got, _ = sharded_logprobs(model, rows, 0, rows.layout(None, enable_sequence_parallel(model, 1)))
    assert torch.equal(got.detach(), reference)
    # Without a layout the switched model is the plain one under the mask it is given.
    assert torch.equal(_whole_row(model, ids, positions, sequences)[0], reference)
    eager = build_model(SHAPE, VOCAB, eos_id=1, pad_id=0)
    eager.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="not eager"):
        enable_sequence_parallel(eager, 2)


def test_the_config_refuses_a_group_size_that_does_not_divide_the_ranks_and_what_it_does_not_run_with():
    from pydantic import ValidationError

    from rlhf_cluster.config import JobConfig

    def learner(**settings):
        return JobConfig.model_validate({"learner": {"world_size": 2, **settings}}).learner

    assert learner().sequence_parallel == 1 and learner(sequence_parallel=2).sequence_parallel == 2
    with pytest.raises(ValidationError, match=r"learner\.sequence_parallel=2 must divide learner\.world_size=3"):
        learner(world_size=3, sequence_parallel=2)
    with pytest.raises(ValidationError, match="fsdp2 backend only, not deepspeed"):
        learner(sequence_parallel=2, backend="deepspeed")
    with pytest.raises(ValidationError, match="needs learner.sequence_packing"):
        learner(sequence_parallel=2, sequence_packing=False)
    with pytest.raises(ValidationError, match="LoRA"):
        learner(sequence_parallel=2, lora={"rank": 4})
    with pytest.raises(ValidationError, match="learner.compile"):
        learner(sequence_parallel=2, compile=True)
    with pytest.raises(ValidationError, match=r"learner\.attention to varlen, flash_attention_2 or flex_attention"):
        learner(sequence_parallel=2, attention="eager")


# The learner's step: rows of (prompt, response) lengths; world 2 deals them into 2 shares.
STEP_ROWS = [(5, 30), (20, 9), (7, 41), (30, 6), (4, 24), (12, 13)]


def _step_config(world: int, sequence_parallel: int):
    from rlhf_cluster.config import JobConfig

    # Checkpointed: the layers' recompute in the backward must get the `sequence_parallel=` layout too.
    learner = {
        "world_size": world,
        "sequence_parallel": sequence_parallel,
        "lr": 1e-2,
        "mini_batches": 2,
        "gradient_checkpointing": True,
    }
    return JobConfig.model_validate({"learner": learner, "algorithm": {"kl": {"placement": "loss", "coef": 0.1}}})


def _learner_step(model_path: str, world: int, rank: int) -> tuple[dict, dict]:
    """One FSDP2 learner step on this rank's share (world 2: sequence_parallel 2, one group)."""
    from rlhf_cluster.learner.base import LearnerSpec
    from rlhf_cluster.learner.fsdp2 import FSDP2Learner
    from rlhf_cluster.models.packing import balanced_shares
    from tests.batches import ragged_batch

    batch = ragged_batch(STEP_ROWS, seed=3)
    shares = balanced_shares(batch.attention_mask.sum(1).tolist(), WORLD)
    # World 1 runs the rows in the order the group joins its shares in: the same mini-batches.
    local = _rows_of(batch, shares[rank] if world > 1 else shares[0] + shares[1])
    learner = FSDP2Learner(LearnerSpec.of_policy(_step_config(world, world)), model_path)
    assert learner.memory_plan.checkpointing
    with _host_reads(learner) as reads:
        metrics = learner.train_step(local, kl_coef=0.1)
    metrics["host reads"] = list(reads)
    metrics["probe"] = learner.probe_logprobs([[3, 4, 5, 6]], [[7, 8, 9]])[0]  # the plain attention, every rank
    return metrics, {k: v.detach().clone() for k, v in learner.full_state_dict().items()}


@contextlib.contextmanager
def _host_reads(learner):
    """The device reads of a step, counted as tests/unit/test_host_syncs.py counts them; the group's
    join of its shares (`group_share`: pickled rows over gloo, the host's) left out with the planning."""
    import rlhf_cluster.learner.base as base
    from tests.unit.test_host_syncs import counting

    with pytest.MonkeyPatch.context() as patch, counting(learner, patch) as mode:

        def joined(*a, _original=base.group_share):
            with mode.pause():
                return _original(*a)

        patch.setattr(base, "group_share", joined)
        yield mode.reads


def _rows_of(batch, rows: list[int]):
    from rlhf_cluster.experience.records import TrainBatch

    def pick(v):
        return v[torch.tensor(rows)] if isinstance(v, torch.Tensor) else None if v is None else [v[i] for i in rows]

    return TrainBatch(**{k: pick(v) for k, v in vars(batch).items()})


def test_a_learner_step_split_over_two_ranks_equals_one_rank(two_ranks, tiny_model_path):
    """world_size 2 as one sequence-parallel group of 2 against world_size 1 on the same batch:
    the same loss, gradient norm, token count and weights (the tolerances of the packed-vs-padded
    learner test, test_packing.py: AdamW moves a weight by about lr whatever its gradient, so
    rounding shows at a fraction of lr; a gradient averaged instead of summed over the group would
    halve the norm)."""
    found, exitcodes = two_ranks  # the step is the ranks' third result, after the two above
    assert all(code == 0 for code in exitcodes), (found, exitcodes)
    assert [kind for kind, _ in found] == ["compare", "learner rows", "step"], found
    _, got = found[2]
    with one_rank_process_group("gloo"):
        want = _learner_step(tiny_model_path, 1, 0)
    (metrics, weights), (ref_metrics, ref_weights) = got, want
    assert metrics["policy/loss"] == pytest.approx(ref_metrics["policy/loss"], abs=1e-5)
    assert metrics["learner/grad_norm"] == pytest.approx(ref_metrics["learner/grad_norm"], rel=1e-4)
    assert metrics["learner/tokens"] == ref_metrics["learner/tokens"]
    # One device read per optimizer update (2 mini-batches), as without sequence parallelism.
    assert len(metrics["host reads"]) == 2 and len(ref_metrics["host reads"]) == 2, (metrics, ref_metrics)
    assert metrics["probe"] == pytest.approx(ref_metrics["probe"], abs=1e-5)
    for name, weight in ref_weights.items():
        got_weight = torch.from_numpy(weights[name])
        assert torch.allclose(weight, got_weight, atol=5e-4), (name, (weight - got_weight).abs().max())
