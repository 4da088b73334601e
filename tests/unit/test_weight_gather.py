"""How a version's tensors leave the learner's shards (`rlhf_cluster.learner.gather`): a DTensor
gathered to its sender alone equals the whole tensor there (uneven and empty shards included) and
reaches no other rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rlhf_cluster.learner.gather import gathered_to
from tests.process_groups import join_ranks, spawn_ranks

WORLD = 2
SHAPES = [(5, 3), (1, 4), (4,), (2, 2)]  # uneven rows, an empty shard, a vector, even


def _rank(rank: int, port: int, failures) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for i, shape in enumerate(SHAPES):
            full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) + 100 * i
            sharded = distribute_tensor(full, mesh, [Shard(0)])
            for owner in range(WORLD):
                got = gathered_to(sharded, owner)
                if rank != owner and got is not None:
                    failures.put(f"rank {rank}: {shape} gathered to {owner} came here too")
                if rank == owner and (got is None or not torch.equal(got, full)):
                    failures.put(f"rank {rank}: {shape}: {got} != {full}")
        dist.barrier()  # neither rank tears its end down while the other still gathers
    except BaseException as exc:
        failures.put(f"rank {rank}: {exc!r}")
    finally:
        dist.destroy_process_group()


def test_a_tensor_gathered_to_its_sender_is_whole_there_and_nowhere_else():
    failures, procs = spawn_ranks(_rank, WORLD)
    join_ranks(procs, timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert not found, found
