"""The loop that drives a vLLM engine: one thread adds requests between engine steps, steps the
engine, and resolves each batch of requests' future as soon as its last request finishes; work
handed to `at_token_boundary` runs on that thread between two steps.

`EngineLoop` is `VLLMEngine`'s base: the engine builds vLLM's `LLMEngine` (`self.engine`) and
its request API, the loop keeps the requests in flight and the thread.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.v1.engine.llm_engine import LLMEngine

    from rlhf_cluster.generation.routing_capture import EngineRouting


@dataclass
class _Batch:
    """Engine requests answered together: the n responses of a group, or the sequences of one scoring call."""

    inputs: list  # per request: (prompt, SamplingParams)
    finish: Callable[[list], object]  # final outputs (in input order) -> the future's result
    future: Future
    outputs: list = field(default_factory=list)
    remaining: int = 0
    routed: bool = False  # its requests' routed experts are kept (mixture-of-experts rollouts)


class EngineLoop:
    """Requests in, outputs out, on one thread that owns vLLM's engine (`self.engine`, set by the
    subclass before `_start_loop`)."""

    engine: LLMEngine
    name: str
    routing: EngineRouting | None = None  # the routed experts of `routed` batches (MoE rollouts)

    def _start_loop(self) -> None:
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._incoming: list[_Batch] = []
        self._at_boundary: list[tuple[Callable[[], object], Future]] = []
        self._requests: dict[str, tuple[_Batch, int]] = {}  # engine request id -> (its batch, index in it)
        self._failure: BaseException | None = None
        self._closed = False
        self._loop = threading.Thread(target=self._run, name=f"{self.name}-engine-loop", daemon=True)
        self._loop.start()

    def _lora_request(self):
        """The LoRA adapter new requests run on (None: the model itself)."""
        return None

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._incoming or self._at_boundary or self._requests or self._closed):
                        self._wake.wait()
                    if self._closed:
                        return
                    incoming, self._incoming = self._incoming, []
                    at_boundary, self._at_boundary = self._at_boundary, []
                # Between two engine steps: a token boundary for every request in flight.
                for fn, future in at_boundary:
                    try:
                        future.set_result(fn())
                    except Exception as exc:  # noqa: BLE001 - the caller receives it
                        future.set_exception(exc)
                for batch in incoming:
                    self._add(batch)
                if self._requests:
                    for out in self.engine.step():
                        self._finished(out)
        except BaseException as exc:  # the engine is unusable: every waiter hears why
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._wake:
            self._failure = exc
            pending = {id(b): b for b, _ in self._requests.values()} | {id(b): b for b in self._incoming}
            self._requests.clear()
            self._incoming.clear()
            boundary, self._at_boundary = self._at_boundary, []
        for batch in pending.values():
            if not batch.future.done():
                batch.future.set_exception(exc)
        for _, future in boundary:
            future.set_exception(exc)

    def _add(self, batch: _Batch) -> None:
        from vllm.exceptions import VLLMClientError

        batch.outputs = [None] * len(batch.inputs)
        batch.remaining = len(batch.inputs)
        for i, (prompt, params) in enumerate(batch.inputs):
            try:
                self._add_request(batch, i, prompt, params)
            except VLLMClientError as exc:  # a request vLLM refuses (e.g. too long) fails its caller, not the engine
                added = [rid for rid, (b, _) in self._requests.items() if b is batch]
                for rid in added:
                    del self._requests[rid]
                    self._request_dropped(rid)
                if added:  # the batch's requests vLLM took before the refused one
                    self.engine.abort_request(added)
                batch.future.set_exception(exc)
                return

    def _add_request(self, batch: _Batch, index: int, prompt, params) -> None:
        request_id = f"{self.name}-{next(self._ids)}"
        # Adding steps nothing: no output before it is registered. vLLM runs the request under
        # an internal id of its own (ours and a suffix); its outputs carry ours.
        internal_id = self.engine.add_request(request_id, prompt, params, lora_request=self._lora_request())
        self._requests[request_id] = (batch, index)
        if batch.routed and self.routing is not None:
            self.routing.added(request_id, internal_id)

    def _request_dropped(self, request_id: str) -> None:
        """A request left the engine unfinished (aborted): its routing never reaches a rollout."""
        if self.routing is not None:
            self.routing.dropped(request_id)

    def _finished(self, out) -> None:
        if not out.finished:
            return
        batch, index = self._requests.pop(out.request_id)
        if batch.routed and self.routing is not None:
            self.routing.finished(out)  # taken out before `finish` builds the batch's results
        batch.outputs[index] = out
        batch.remaining -= 1
        if batch.remaining == 0:
            try:
                batch.future.set_result(batch.finish(batch.outputs))
            except Exception as exc:  # noqa: BLE001 - a bad output fails its own caller only
                batch.future.set_exception(exc)

    def _submit(self, inputs: list, finish: Callable[[list], object], routed: bool = False) -> Future:
        future: Future = Future()
        with self._wake:
            if self._failure is not None:
                raise RuntimeError(f"{self.name}: the engine loop died") from self._failure
            if self._closed:
                raise RuntimeError(f"{self.name}: the engine is closed")
            self._incoming.append(_Batch(inputs, finish, future, routed=routed))
            self._wake.notify()
        return future

    def at_token_boundary(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the loop thread between two engine steps; the future holds its result."""
        future: Future = Future()
        with self._wake:
            if self._failure is not None:
                raise RuntimeError(f"{self.name}: the engine loop died") from self._failure
            self._at_boundary.append((fn, future))
            self._wake.notify()
        return future

    def in_flight(self) -> int:
        """Engine requests (single responses) not finished yet."""
        with self._wake:
            return len(self._requests) + sum(len(b.inputs) for b in self._incoming)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._loop.join(timeout=30)
