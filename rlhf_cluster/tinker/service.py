"""The Tinker service: what each route of the SDK does, on a training and a sampling backend.

Training calls (create, forward_backward, optim_step, save, load, export for sampling) run one at
a time on one thread, in the order they arrive: the SDK sends a client's calls in order, and every
client shares the learner ranks. Sampling calls run on a pool of threads, so one client's samples
never wait for another's training. Both answer with a future at once. Direct errors (a bad field,
an unknown model) are `ServiceError`s with the HTTP status the SDK expects; a call that fails while
it runs fails its future, as the user's fault (`UserError`, a loss or wire error) or the server's,
and the service keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from rlhf_cluster.config.tinker import TinkerConfig
from rlhf_cluster.fileio import write_atomic
from rlhf_cluster.tinker import proto, replies
from rlhf_cluster.tinker.backends import SampleBackend, TrainBackend
from rlhf_cluster.tinker.futures import Category, FutureTable, Outcome, TryAgain, UserError
from rlhf_cluster.tinker.losses import LossError, check_loss
from rlhf_cluster.tinker.paths import TinkerPath, state_folder
from rlhf_cluster.tinker.records import AdamParams, LoraSpec, SampleSpec
from rlhf_cluster.tinker.sessions import Sampler, Sessions, TrainingClient
from rlhf_cluster.tinker.stats import TinkerStats

log = logging.getLogger(__name__)
META = "tinker.json"  # beside a saved state: what it is, so a restarted server can load it
# A client's newest samplers of unnamed saves (an RL loop makes one a step); older ones end (404).
UNNAMED_SAMPLERS_KEPT = 4
T = TypeVar("T")


class ServiceError(Exception):
    """A request answered at once with an HTTP error: `status` and a `detail` naming the field."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _live(table: Mapping[str, T], key: str, missing: str) -> T:
    """`table[key]`, or a 404 whose detail is `missing` where the server holds nothing under `key`."""
    found = table.get(key)
    if found is None:
        raise ServiceError(404, missing)
    return found


class TinkerService:
    def __init__(self, cfg: TinkerConfig, train: TrainBackend, sample: SampleBackend, tokenizer_dir: str):
        self.cfg, self.train, self.sample_backend, self.tokenizer_dir = cfg, train, sample, tokenizer_dir
        self.state = cfg.state_path()
        self.sessions = Sessions(cfg.session_timeout_s)
        self.stats = TinkerStats()
        self.futures = FutureTable(cfg.future_ttl_s, on_change=self.stats.future_change)
        self._train = ThreadPoolExecutor(1, thread_name_prefix="tinker-train")
        self._sample = ThreadPoolExecutor(16, thread_name_prefix="tinker-sample")
        # Saved sampler weights the engines serve, by path: each loads once, on first use, and stays
        # until its checkpoint is deleted (an engine evicts what it has not used lately by itself).
        self._loads: dict[str, _Once] = {}

    # ---------------------------------------------------------------- sessions

    def create_session(self, tags: list[str], metadata: dict[str, str]) -> str:
        return self.sessions.create(tags, metadata)

    def heartbeat(self, session_id: str) -> None:
        if not self.sessions.beat(session_id):
            raise ServiceError(410, f"session {session_id} has ended (no heartbeat for {self.cfg.session_timeout_s} s)")

    async def expire_sessions(self) -> None:
        """End sessions without heartbeats: their clients' adapters and samplers go."""
        for sid in self.sessions.expired():
            await self._release(sid)
            log.info("session %s ended without a heartbeat", sid)

    async def finish_session(self, session_id: str) -> None:
        """The client closed its session: its clients' adapters and samplers go now (what it saved stays)."""
        if not self.sessions.end(session_id):
            raise ServiceError(404, f"session_id: {session_id!r} is not a live session of this server")
        await self._release(session_id)

    async def _release(self, session_id: str) -> None:
        for model_id in self.sessions.clients_of(session_id):
            await self._run_train(partial(self._drop_client, model_id))
        for sampler_id in self.sessions.samplers_of(session_id=session_id):
            await asyncio.get_running_loop().run_in_executor(self._sample, self._drop_sampler, sampler_id)

    def _session(self, session_id: str) -> None:
        if session_id not in self.sessions.sessions:
            raise ServiceError(404, f"session_id: {session_id!r} is not a live session of this server")

    # ---------------------------------------------------------------- training clients

    def client(self, model_id: str) -> TrainingClient:
        return _live(
            self.sessions.clients,
            model_id,
            f"model_id: {model_id!r} is not a training client of this server (ended, never "
            "made, or lost with a restart: load your last saved state)",
        )

    def _base(self, base_model: str | None) -> None:
        if base_model is not None and base_model != self.cfg.model.name:
            raise ServiceError(
                400, f"base_model: {base_model!r} is not served here; this server serves {self.cfg.model.name!r}"
            )

    def create_model(self, session_id: str, seq: int, base_model: str, lora: LoraSpec) -> str:
        self._session(session_id)
        self._base(base_model)
        if lora.rank > self.cfg.lora.max_rank:
            raise ServiceError(
                400, f"lora_config.rank: {lora.rank} is above this server's lora.max_rank {self.cfg.lora.max_rank}"
            )
        model_id = self.sessions.model_id(session_id, seq)

        def create() -> dict:
            self._room_for(model_id)
            self.train.create(model_id, lora)
            self.sessions.clients[model_id] = TrainingClient(model_id, session_id, lora)
            self.stats.clients(len(self.sessions.clients))
            return replies.CreateModelResponse(model_id=model_id).model_dump()

        return self._submit(f"{model_id}:create", "create_model", self._train, create)

    def _room_for(self, model_id: str) -> None:
        if model_id not in self.sessions.clients and len(self.sessions.clients) >= self.cfg.lora.max_clients:
            raise UserError(
                f"all {self.cfg.lora.max_clients} adapter slots are in use (lora.max_clients); a slot "
                "frees when its session ends"
            )

    def get_info(self, model_id: str) -> dict:
        c = self.client(model_id)
        name = self.cfg.model.name
        data = replies.ModelData(arch="lora", model_name=name, tokenizer_id=self.tokenizer_dir)
        return replies.GetInfoResponse(
            model_id=model_id, lora_rank=c.lora.rank, model_name=name, model_data=data
        ).model_dump()

    def forward_backward(self, call: proto.ForwardBackwardCall) -> str:
        c = self.client(call.model_id)
        try:
            check_loss(call.loss_fn, call.loss_fn_config, [d.inputs for d in call.datums])
        except LossError as exc:
            raise ServiceError(400, str(exc)) from None
        longest = max((d.length for d in call.datums), default=0)
        if longest > self.cfg.model.max_context_length:
            raise ServiceError(
                400,
                f"data: a datum of {longest} tokens is longer than model.max_context_length "
                f"{self.cfg.model.max_context_length}",
            )

        def run() -> bytes:
            outputs, metrics = self.train.forward_backward(
                call.model_id, call.datums, call.loss_fn, call.loss_fn_config, not call.forward_only
            )
            if not call.forward_only:
                tokens = sum(d.length for d in call.datums)
                c.tokens_trained += tokens
                self.stats.trained(call.model_id, tokens)
            return proto.encode_forward_backward_output([{"logprobs": lp} for lp in outputs], metrics)

        kind = "forward" if call.forward_only else "forward_backward"
        return self._submit(f"{call.model_id}:{call.seq_id}", kind, self._train, run)

    def optim_step(self, model_id: str, seq: int, adam: AdamParams) -> str:
        self.client(model_id)
        return self._submit(
            f"{model_id}:{seq}",
            "optim_step",
            self._train,
            lambda: replies.OptimStepResponse(metrics=self.train.optim_step(model_id, adam)).model_dump(),
        )

    def save_weights(self, model_id: str, seq: int, name: str | None) -> str:
        c = self.client(model_id)
        path = TinkerPath(model_id, "weights", name or f"{seq:06d}")

        def save() -> dict:
            folder = state_folder(self.state, path)
            self.train.save(model_id, folder, optimizer=True)
            self._write_meta(folder, path, c.lora)
            return replies.SaveWeightsResponse(path=path.uri).model_dump()

        return self._submit(f"{model_id}:{seq}", "save_weights", self._train, save)

    def load_weights(self, model_id: str, seq: int, uri: str, optimizer: bool) -> str:
        """Load a saved state into an existing client (`model_id` given) or into a new one made
        from the session and its sequence number (the SDK's create-from-state)."""
        path, meta = self._saved(uri, "weights", status=404)  # as a sampler's missing state is (trial 23b T1)
        lora = LoraSpec(**meta["lora"])
        known = model_id in self.sessions.clients
        session_id = model_id.split(":", 1)[0]
        if not known:
            self._session(session_id)

        def load() -> dict:
            if not known:
                self._room_for(model_id)
            self.train.load(model_id, state_folder(self.state, path), optimizer)
            if not known:
                self.sessions.clients[model_id] = TrainingClient(model_id, session_id, lora)
                self.stats.clients(len(self.sessions.clients))
            return replies.LoadWeightsResponse(path=uri, model_id=model_id).model_dump()

        return self._submit(f"{model_id}:{seq}:load", "load_weights", self._train, load)

    def save_for_sampler(self, model_id: str, seq: int, name: str | None, sampler_seq: int | None) -> str:
        """A named save (`tinker://<model>/sampler_weights/<name>`, kept) or, without a name, a
        sampler of the adapter as it is now, which lives as long as its client."""
        c = self.client(model_id)
        if name is None and sampler_seq is None:
            raise ServiceError(400, "path or sampling_session_seq_id: one is required")

        def save() -> dict:
            if name is not None:
                path = TinkerPath(model_id, "sampler_weights", name)
                folder = state_folder(self.state, path)
                digest = self.train.export_adapter(model_id, folder)
                self._write_meta(folder, path, c.lora, digest)
                return replies.SaveWeightsForSamplerResponseInternal(path=path.uri).model_dump()
            sampler_id = self.sessions.sampler_id(c.session_id, int(sampler_seq or 0))
            folder = self.state / "ephemeral" / sampler_id.replace(":", "_")
            digest = self.train.export_adapter(model_id, folder)
            self._add_adapter(sampler_id, folder, digest)
            self.sessions.samplers[sampler_id] = Sampler(sampler_id, c.session_id, sampler_id, None, owner=model_id)
            # An RL loop makes one each step: the client's oldest go, so engines and disk stay bounded.
            for old in self.sessions.samplers_of(owner=model_id)[:-UNNAMED_SAMPLERS_KEPT]:
                self._drop_sampler(old)
            return replies.SaveWeightsForSamplerResponseInternal(sampling_session_id=sampler_id).model_dump()

        return self._submit(f"{model_id}:{seq}", "save_weights_for_sampler", self._train, save)

    # ---------------------------------------------------------------- sampling

    def create_sampler(self, session_id: str, seq: int, base_model: str | None, model_path: str | None) -> str:
        self._session(session_id)
        self._base(base_model)
        sampler_id = self.sessions.sampler_id(session_id, seq)
        adapter = None
        if model_path is not None:
            path, meta = self._saved(model_path, "sampler_weights", status=404)
            adapter = path.uri
            self._load_of(path, meta)()
        self.sessions.samplers[sampler_id] = Sampler(sampler_id, session_id, adapter, model_path)
        return sampler_id

    def _load_of(self, path: TinkerPath, meta: dict) -> _Once:
        if path.uri not in self._loads:
            folder = state_folder(self.state, path)
            self._loads[path.uri] = _Once(partial(self._add_adapter, path.uri, folder, meta["digest"]))
        return self._loads[path.uri]

    def sampler(self, sampler_id: str) -> dict:
        s = _live(self.sessions.samplers, sampler_id, f"sampler {sampler_id!r} is not known to this server")
        return replies.GetSamplerResponse(
            sampler_id=sampler_id, base_model=self.cfg.model.name, model_path=s.model_path
        ).model_dump()

    def sample(
        self,
        sampler_id: str | None,
        base_model: str | None,
        model_path: str | None,
        seq: int | None,
        prompt: list[int],
        n: int,
        spec: SampleSpec,
    ) -> tuple[str, list[str]]:
        """Start `n` samples; returns the future's id and one id per sample."""
        adapter, load = self._adapter_for(sampler_id, base_model, model_path)
        if not prompt:
            raise ServiceError(400, "prompt: holds no tokens")
        if len(prompt) + spec.max_tokens > self.cfg.model.max_context_length:
            raise ServiceError(
                400,
                f"sampling_params.max_tokens: the prompt's {len(prompt)} tokens plus "
                f"{spec.max_tokens} exceed model.max_context_length {self.cfg.model.max_context_length}",
            )
        owner = sampler_id or model_path or self.cfg.model.name
        request_id = f"{owner}:{seq}" if seq is not None else f"{owner}:{uuid.uuid4().hex[:12]}"

        def run() -> bytes:
            if load is not None:  # a saved path sampled without a sampler: its adapter loads first, once
                load()
            result = self.sample_backend.sample(adapter, prompt, n, spec)
            self.stats.sampled(owner, sum(len(s.tokens) for s in result.sequences))
            return proto.encode_sample_response(result)

        request_id = self._submit(request_id, "sample", self._sample, run)
        return request_id, [f"{request_id}:{i}" for i in range(n)]

    def _adapter_for(
        self, sampler_id: str | None, base_model: str | None, model_path: str | None
    ) -> tuple[str | None, Callable[[], None] | None]:
        """The engines' adapter a sample runs on (None: the base model), and the load it needs
        first when none holds it yet (run on a sampling thread, never on the event loop)."""
        if sampler_id is not None:
            s = _live(
                self.sessions.samplers,
                sampler_id,
                f"sampling_session_id: {sampler_id!r} is not a live sampler (its session or "
                "training client ended, or its weights were deleted)",
            )
            return s.adapter, None
        if model_path is not None:
            path, meta = self._saved(model_path, "sampler_weights", status=404)
            return path.uri, self._load_of(path, meta)
        self._base(base_model)
        return None, None

    # ---------------------------------------------------------------- saved states

    def weights_info(self, uri: str) -> dict:
        _, meta = self._saved(uri, None, status=404)
        lora = meta["lora"]
        return replies.WeightsInfoResponse(
            base_model=meta["base_model"],
            lora_rank=lora["rank"],
            train_attn=lora["train_attn"],
            train_mlp=lora["train_mlp"],
            train_unembed=lora["train_unembed"],
        ).model_dump()

    def delete_checkpoint(self, model_id: str, checkpoint_id: str) -> None:
        path, _ = self._saved(f"tinker://{model_id}/{checkpoint_id}", None, status=404)
        for sampler_id in [sid for sid, s in self.sessions.samplers.items() if s.adapter == path.uri]:
            self._drop_sampler(sampler_id)
        if self._loads.pop(path.uri, None) is not None:
            self.sample_backend.remove_adapter(path.uri)
        shutil.rmtree(state_folder(self.state, path), ignore_errors=True)

    def _saved(self, uri: str, kind: str | None, status: int = 400) -> tuple[TinkerPath, dict]:
        try:
            path = TinkerPath.parse(uri)
        except ValueError as exc:
            raise ServiceError(400, f"path: {exc}") from None
        if kind is not None and path.kind != kind:
            raise ServiceError(400, f"path: {uri!r} is a {path.kind} path; this call takes a {kind} path")
        meta_file = state_folder(self.state, path) / META
        if not meta_file.is_file():
            raise ServiceError(status, f"path: {uri!r} names no saved state on this server (never saved, or deleted)")
        return path, json.loads(meta_file.read_text())

    def _write_meta(self, folder: Path, path: TinkerPath, lora: LoraSpec, digest: str | None = None) -> None:
        meta = {"path": path.uri, "base_model": self.cfg.model.name, "lora": vars(lora), "digest": digest}
        write_atomic(folder / META, json.dumps(meta))

    # ---------------------------------------------------------------- engines' adapters

    def _add_adapter(self, name: str, folder: Path, digest: str) -> None:
        self.sample_backend.add_adapter(name, folder, digest)

    def _drop_sampler(self, sampler_id: str) -> None:
        """A sampler ends; an unnamed save's adapter (its own) goes with it, a saved path's stays."""
        s = self.sessions.samplers.pop(sampler_id, None)
        if s is None or s.adapter is None or s.owner is None:
            return
        self.sample_backend.remove_adapter(s.adapter)
        shutil.rmtree(self.state / "ephemeral" / sampler_id.replace(":", "_"), ignore_errors=True)

    def _drop_client(self, model_id: str) -> None:
        for sampler_id in self.sessions.samplers_of(owner=model_id):
            self._drop_sampler(sampler_id)
        if self.sessions.clients.pop(model_id, None) is not None:
            self.train.free(model_id)
        self.stats.clients(len(self.sessions.clients))

    def unload(self, model_id: str) -> str:
        self.client(model_id)

        def unload() -> dict:
            self._drop_client(model_id)
            return replies.UnloadModelResponse(model_id=model_id).model_dump()

        return self._submit(f"{model_id}:unload", "unload_model", self._train, unload)

    # ---------------------------------------------------------------- futures

    def _submit(self, request_id: str, kind: str, pool: ThreadPoolExecutor, work: Callable[[], dict | bytes]) -> str:
        """Start `work` on `pool` under `request_id` (once: a call sent again finds its future)."""
        if self.futures.start(request_id, kind):
            loop = asyncio.get_running_loop()
            done = loop.run_in_executor(pool, _outcome_of, work, kind)
            done.add_done_callback(lambda f: self.futures.finish(request_id, f.result()))
        return request_id

    async def _run_train(self, work: Callable[[], object]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._train, work)

    async def retrieve(self, request_id: str) -> Outcome | TryAgain | None:
        return await self.futures.wait(request_id, self.cfg.long_poll_s)

    def close(self) -> None:
        self._train.shutdown(wait=True, cancel_futures=True)
        self._sample.shutdown(wait=True, cancel_futures=True)


class _Once:
    """`load()` runs `work` once; later calls wait for that run and raise as it did."""

    def __init__(self, work: Callable[[], None]):
        self.work, self.lock, self.done = work, threading.Lock(), False
        self.error: BaseException | None = None

    def __call__(self) -> None:
        with self.lock:
            if not self.done:
                try:
                    self.work()
                except BaseException as exc:
                    self.error = exc
                self.done = True
        if self.error is not None:
            raise self.error


def _outcome_of(work: Callable[[], dict | bytes], kind: str) -> Outcome:
    """Run `work` and say how it went; an exception becomes a failed outcome, never a dead thread."""
    from rlhf_cluster.tinker.proto import WireError

    try:
        return Outcome(body=work())
    except (UserError, LossError, WireError, KeyError, ValueError) as exc:
        return Outcome(error=f"{kind}: {exc}", category=Category.USER)
    except Exception as exc:  # the server's fault: the future says so, and the service keeps serving
        log.exception("%s failed", kind)
        return Outcome(error=f"{kind} failed on the server: {type(exc).__name__}: {exc}", category=Category.SERVER)
