"""The policy step waits for the device once per optimizer update (issue 35).

On a GPU every read of a device value (`.item()`, `float()`, `bool()`, `.tolist()`, boolean-mask
indexing) stalls the host until the device has caught up, and the host then has nothing queued for
it. On the CPU nothing stalls, so the reads are counted instead: every `_local_scalar_dense` (what
`.item()`, `float()` and `bool()` dispatch to), `nonzero` and `masked_select` (a boolean index), and
every `.tolist()` / `.numpy()`, made while a step runs. Two places are not the device's and are left
out: planning micro-batches (it reads the host copy of the batch) and the optimizer's own step
(AdamW is fused on CUDA; on the CPU its per-parameter step counters are host values).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf_cluster.config import JobConfig
from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.learner.spec import LearnerSpec
from tests.batches import ragged_batch

READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"}


def reads_the_device(func, args, kwargs) -> bool:
    """Whether an operation needs a device value on the host: the reads above, indexing by a boolean
    mask (its output size is the mask's count; on the CPU it reaches no `nonzero` a dispatch mode
    sees) and `repeat_interleave` by a repeats tensor without its output size."""
    name = func._schema.name
    if name in READS:
        return True
    if name == "aten::index":
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    if name == "aten::repeat_interleave":
        return isinstance(args[0] if args else None, torch.Tensor) and len(args) < 2 and \
            (kwargs or {}).get("output_size") is None
    return False


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value back to the host, with where they came from."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and reads_the_device(func, args, kwargs):
            self.reads.append(func._schema.name)
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


@contextlib.contextmanager
def counting(learner, monkeypatch):
    mode = HostReads()
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _original=original, _name=name, **k):
            if not mode.paused:
                mode.reads.append(f"Tensor.{_name}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    for obj, method in ((learner, "_micro_batches"), (learner.optimizer, "step")):
        original = getattr(obj, method)

        def unpaused(*a, _original=original, **k):
            with mode.pause():
                return _original(*a, **k)

        monkeypatch.setattr(obj, method, unpaused)
    with mode:
        yield mode


def _batch(n: int = 6) -> TrainBatch:
    return ragged_batch([(3 + i % 3, 2 + (5 * i) % 7) for i in range(n)], seed=0)


@pytest.mark.parametrize("mini_batches,budget,packing", [(1, None, True), (2, None, True), (2, 10, True), (2, 10, False)])
def test_one_host_read_per_optimizer_update(gloo_group, tiny_model_path, monkeypatch, mini_batches, budget, packing):
    cfg = JobConfig.model_validate({
        "learner": {"world_size": 1, "lr": 1e-3, "mini_batches": mini_batches, "max_tokens_per_micro_batch": budget,
                    "sequence_packing": packing},
        "algorithm": {"kl": {"placement": "loss", "coef": 0.1}, "correction": {"enabled": True, "mode": "truncate"}},
    })
    learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
    learner.train_step(_batch(), kl_coef=0.1)  # first step: lazy initialisation is not the step's
    with counting(learner, monkeypatch) as mode:
        metrics = learner.train_step(_batch(), kl_coef=0.1)
    updates = mini_batches * cfg.learner.ppo_epochs
    assert len(mode.reads) == updates, mode.reads
    assert metrics["learner/skipped_updates"] == 0 and metrics["policy/loss"] == metrics["policy/loss"]
    assert {"policy/kl", "policy/entropy", "correction/ess", "correction/weight_max", "policy/ratio_max"} <= set(metrics)
    # The step's FLOPs both ways (models.flops), read with the rest: every real token once per epoch.
    assert metrics["learner/flops_with_attention"] > metrics["learner/flops_dense"] > 0
    assert metrics["learner/tflops_per_s_dense"] > 0


def test_the_counter_sees_boolean_indexing_and_tensor_repeats():
    """The reads a dispatch mode on the CPU would otherwise miss are counted; an index by positions is not one."""
    mode = HostReads()
    x = torch.arange(6)
    with mode:
        x[x % 2 == 0]
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))
        x[torch.tensor([0, 2])]
    assert mode.reads == ["aten::index", "aten::repeat_interleave"]
