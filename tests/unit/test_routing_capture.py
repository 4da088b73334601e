"""The CPU routing capture's bookkeeping (no vLLM): engine steps of several requests filed under
their request and sequence position, prefill chunks, recomputed positions overwritten, aborted
requests dropped, where a routing starts, and the prompt rows a group's later responses share."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf_cluster.generation.routing_capture import EngineRouting, RouterCapture, RoutingBook, share_prompt_routing
from rlhf_cluster.models.routed_experts import expand_routing

LAYERS, TOP_K, EXPERTS = 3, 2, 8


def routing_of(request: int, position: int) -> np.ndarray:
    """A made-up routing [layers, top_k] that names its request and position."""
    base = request * 3 + position
    return np.array([[(base + layer) % EXPERTS, (base + layer + 1) % EXPERTS] for layer in range(LAYERS)])


def step(book: RoutingBook, runs: list[tuple[str, int, int]], salt: int = 0) -> int:
    """One engine step: (request id, first position, tokens) per request, flattened in that order."""
    ids = [rid for rid, _, _ in runs]
    counts = [n for _, _, n in runs]
    positions = np.concatenate([np.arange(first, first + n) for _, first, n in runs])
    experts = np.stack([routing_of(int(rid[1:]) + salt, first + i) for rid, first, n in runs for i in range(n)]).astype(
        np.uint8
    )
    return book.record(ids, counts, positions, experts)


def expected(request: int, positions: range, salt: int = 0) -> np.ndarray:
    return np.stack([routing_of(request + salt, p) for p in positions])


def test_interleaved_requests_and_prefill_chunks_land_on_their_own_positions():
    book = RoutingBook(LAYERS, TOP_K, EXPERTS)
    for rid in ("r1", "r2", "r3"):
        book.track(rid)
    # r1: 6-token prompt in two prefill chunks; r2: 3-token prompt at once; then decodes, r3 joins late.
    step(book, [("r1", 0, 4), ("r2", 0, 3)])
    step(book, [("r2", 3, 1), ("r1", 4, 2)])  # another order in the batch: rows follow the ids
    step(book, [("r1", 6, 1), ("r2", 4, 1), ("r3", 0, 5)])
    step(book, [("r3", 5, 1), ("r1", 7, 1)])
    # r1: 6 prompt + 3 response tokens (the last, sampled at position 7's step, never ran).
    rows, start = book.take("r1", 9)
    assert start == 0 and np.array_equal(rows, expected(1, range(8)))
    rows, start = book.take("r2", 6)
    assert start == 0 and np.array_equal(rows, expected(2, range(5)))
    rows, start = book.take("r3", 7)
    assert start == 0 and np.array_equal(rows, expected(3, range(6)))
    assert len(book) == 0  # taken means forgotten


def test_untracked_requests_are_skipped_and_a_short_step_is_refused():
    book = RoutingBook(LAYERS, TOP_K, EXPERTS)
    book.track("r1")
    assert step(book, [("r9", 0, 5), ("r1", 0, 3)]) == 3  # r9 (a scoring request) is not kept
    assert book.any_tracked(["r9", "r1"]) and not book.any_tracked(["r9"])
    rows, _ = book.take("r1", 4)
    assert np.array_equal(rows, expected(1, range(3)))
    with pytest.raises(ValueError, match="3 scheduled tokens came with 2 positions"):
        book.record(["r1"], [3], np.arange(2), np.zeros((3, LAYERS, TOP_K), np.uint8))


def test_a_recomputed_position_keeps_the_latest_rows():
    """A request preempted by an in-flight weight load runs its tokens again with the new weights;
    a speculative draft rejected at a position is decoded there again."""
    book = RoutingBook(LAYERS, TOP_K, EXPERTS)
    book.track("r1")
    step(book, [("r1", 0, 5)])
    step(book, [("r1", 5, 1)])
    step(book, [("r1", 0, 7)], salt=4)  # recomputed after the swap, one token further
    step(book, [("r1", 7, 3)], salt=4)  # 3 drafts verified ...
    step(book, [("r1", 8, 2)], salt=5)  # ... the last two rejected and run again
    rows, start = book.take("r1", 11)  # the sequence ends at position 10: rows 0..9
    assert start == 0
    assert np.array_equal(rows[:8], expected(1, range(8), salt=4))
    assert np.array_equal(rows[8:], expected(1, range(8, 10), salt=5))


def test_an_aborted_request_leaves_nothing():
    book = RoutingBook(LAYERS, TOP_K, EXPERTS)
    book.track("r1")
    step(book, [("r1", 0, 4)])
    book.drop("r1")
    assert len(book) == 0 and book.take("r1", 5) is None
    assert step(book, [("r1", 4, 1)]) == 0  # a step already scheduled for it keeps nothing


def test_routing_starts_where_the_run_reaching_the_end_starts():
    book = RoutingBook(LAYERS, TOP_K, EXPERTS)
    for rid in ("r1", "r2", "r3", "r4"):
        book.track(rid)
    step(book, [("r1", 16, 4)])  # the first 16 prompt tokens came from the prefix cache
    step(book, [("r1", 20, 1)])
    rows, start = book.take("r1", 22)
    assert start == 16 and np.array_equal(rows, expected(1, range(16, 21)))
    # Rows from an earlier run cut off by a gap do not count: the routing is contiguous.
    step(book, [("r2", 0, 3)])
    step(book, [("r2", 5, 3)])
    rows, start = book.take("r2", 9)
    assert start == 5 and len(rows) == 3
    step(book, [("r3", 0, 3)])  # its last position (3) never ran: no routing
    assert book.take("r3", 5) is None
    step(book, [("r4", 0, 100)])  # grows past its first capacity
    rows, start = book.take("r4", 101)
    assert start == 0 and np.array_equal(rows, expected(4, range(100)))


def test_a_groups_later_responses_share_the_prompt_rows_of_the_first():
    prompt = expected(1, range(6))
    first = (np.concatenate([prompt, expected(1, range(6, 9))]), 0)
    second = (expected(2, range(4, 8)), 4)  # prompt positions 0..3 came from the cache
    third = (expected(3, range(6, 8)), 6)  # a response token: only prompt rows are shared
    shared = share_prompt_routing([first, second, None, third], prompt_len=6)
    assert shared[0] is first and shared[2] is None and shared[3] is third
    rows, start = shared[1]
    assert start == 0 and np.array_equal(rows, np.concatenate([prompt[:4], expected(2, range(4, 8))]))
    assert share_prompt_routing([None, None], 6) == [None, None]


def _output(request_id: str, prompt: list[int], response: list[int], routed=None):
    completion = SimpleNamespace(token_ids=response, routed_experts=routed)
    return SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, outputs=[completion], finished=True)


def test_engine_routing_maps_loop_ids_to_internal_ones_and_drops_aborted():
    routing = EngineRouting(EXPERTS, native=False)
    routing.book = RoutingBook(LAYERS, TOP_K, EXPERTS)
    routing.added("gen0-0", "gen0-0-abcd")
    routing.added("gen0-1", "gen0-1-ef01")
    routing.added("gen0-2", "gen0-2-2345")
    ids = ["gen0-0-abcd", "gen0-1-ef01", "gen0-2-2345"]
    routing.book.record(
        ids,
        [4, 4, 4],
        np.tile(np.arange(4), 3),
        np.concatenate([expected(1, range(4)), expected(2, range(4)), expected(3, range(4))]).astype(np.uint8),
    )
    routing.dropped("gen0-2")  # aborted by a weight swap: re-added under a new id
    assert len(routing.book) == 2
    routing.finished(_output("gen0-1", [5, 6, 7], [8, 9]))
    routing.finished(_output("gen0-0", [5, 6, 7], [8, 9]))
    assert len(routing.book) == 0
    routed = routing.group([_output("gen0-0", [5, 6, 7], [8, 9]), _output("gen0-1", [5, 6, 7], [8, 9])], ["s0", "s1"])
    for k, item in enumerate(routed):
        assert item is not None and item.start == 0 and item.tokens == 4
        assert np.array_equal(expand_routing(item, f"s{k}", 5, LAYERS, TOP_K, EXPERTS), expected(k + 1, range(4)))
    assert routing.group([_output("gen0-5", [1], [2])], ["s5"]) == [None]  # never tracked: none


def test_native_routing_is_vllms_array_from_position_zero():
    routing = EngineRouting(EXPERTS, native=True)
    assert routing.engine_args() == {"enable_return_routed_experts": True}
    rows = expected(1, range(4)).astype(np.uint8)
    (item,) = routing.group([_output("gen0-0", [5, 6, 7], [8, 9], routed=rows)], ["s0"])
    assert item is not None and item.start == 0 and item.tokens == 4 and item.layers == LAYERS
    assert routing.group([_output("gen0-1", [5], [8])], ["s1"]) == [None]


class _Runner:
    """A stand-in for vLLM's model runner: one step of `runs` (request id, first position, tokens)
    whose forward calls the routers of `layers` back with made-up routings."""

    def __init__(self, capture_fns: dict):
        self.capture_fns = capture_fns
        self.input_batch = SimpleNamespace(req_ids=[])
        self.positions = torch.zeros(64, dtype=torch.int64)
        self.layers = [0, 2]

    def execute_model(self, scheduler_output):
        return self._model_forward()

    def _model_forward(self):
        for layer in self.layers:  # a padded step: the routers see 2 rows more than were scheduled
            rows = torch.tensor(np.concatenate([self.experts[:, layer], np.zeros((2, TOP_K), np.uint8)]))
            self.capture_fns[layer](rows.to(torch.int32))
        return "hidden"

    def step(self, runs: list[tuple[str, int, int]]):
        self.input_batch.req_ids = [rid for rid, _, _ in runs]
        at = np.concatenate([np.arange(first, first + n) for _, first, n in runs])
        self.positions[: len(at)] = torch.from_numpy(at)
        self.experts = np.stack([routing_of(int(rid[1:]), first + i) for rid, first, n in runs for i in range(n)])
        return self.execute_model(SimpleNamespace(num_scheduled_tokens={rid: n for rid, _, n in runs}))


def test_router_capture_files_a_runners_steps_and_refuses_a_silent_router():
    book = RoutingBook(LAYERS, TOP_K, EXPERTS)
    book.track("r1")
    book.track("r2")
    fns: dict = {}
    runner = _Runner(fns)
    capture = RouterCapture(book, runner)
    fns.update({layer: capture.capture_fn(layer) for layer in (0, 2)})
    capture.layers = [0, 2]
    capture.wrap()
    assert runner.step([("r2", 0, 3), ("r1", 0, 2)]) == "hidden"
    assert runner.step([("r1", 2, 1), ("r2", 3, 1)]) == "hidden"
    runner.step([("r9", 0, 4)])  # no tracked request: nothing read
    rows, start = book.take("r1", 4)
    want = expected(1, range(3))
    assert start == 0 and np.array_equal(rows[:, [0, 2]], want[:, [0, 2]]) and not rows[:, 1].any()  # layer 1: dense
    runner.layers = [0]  # layer 2 routes without calling back (a compiled model)
    with pytest.raises(RuntimeError, match=r"MoE layers \[2\] routed a step without calling back"):
        runner.step([("r2", 4, 1)])


def test_replay_refusals_name_the_setting(tiny_model_path, tmp_path):
    from rlhf_cluster.config import GenerationConfig, TinyModelConfig
    from rlhf_cluster.generation.routing_capture import engine_routing
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    with pytest.raises(ValueError, match="algorithm.routing_replay: rollout needs a mixture-of-experts model"):
        engine_routing(tiny_model_path, GenerationConfig())
    moe = str(ensure_tiny_model(TinyModelConfig(architecture="qwen3_moe"), tmp_path))
    with pytest.raises(ValueError, match="generation.enforce_eager: true"):
        engine_routing(moe, GenerationConfig(enforce_eager=False))
    assert not engine_routing(moe, GenerationConfig()).native
