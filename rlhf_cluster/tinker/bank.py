"""One learner rank's Tinker training clients: LoRA adapters over one frozen base model.

The base carries ONE peft LoRA adapter at `max_rank` on its attention and MLP projections, and one
AdamW over that adapter's parameters. Every client (`model_id`) owns its own copies of the
adapter tensors, its pending gradients, its Adam state per parameter, its rank r and its scale
alpha / r. An op on a client first puts its state into the live adapter (its tensors copied into
the parameters, its gradients handed as `.grad`, its Adam state as the optimizer's, its scale as
peft's `scaling`), runs, and takes back what changed; between ops the live adapter and the
optimizer hold nothing of any client's. So an op on one client cannot reach another's tensors,
gradients or Adam state, and one client's pending gradients survive another's `optim_step`.

A client of rank r < max_rank lives in the first r rows of A and columns of B, the rest exactly 0:
the gradient there is 0 too (it flows through the other matrix's zeros), so Adam keeps it 0.
`train_attn` / `train_mlp` choose which of a client's adapters train; the others stay 0 (A and B)
and get no update, and the exported adapter leaves them out. `train_unembed` is accepted and
ignored: the output layer gets no adapter (vLLM serves none there).

With `fsdp=True` the model is sharded as the FSDP2 learner shards it (each decoder layer, then the
root), and a client's tensors are this rank's shards; saving and exporting gather them (every rank
calls, rank 0 writes). By default every rank runs each call on the same datums (the ranks shard the
model, not the data), and FSDP2's mean of their equal gradients is the batch's. With
`split_data=True` each rank runs its own share of a call's datums instead: its gradients are summed
over ranks (Tinker's losses are sums), and what a call returns is that share's (the caller joins the
log-probs and adds the `:sum` metrics).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from rlhf_cluster.fileio import write_dir_atomic
from rlhf_cluster.models.lora import adapter_file_name, is_adapter_param
from rlhf_cluster.models.modeling import decoder_layers, load_causal_lm
from rlhf_cluster.tinker import shards
from rlhf_cluster.tinker.batch import check_datums, combine_metrics, datum_inputs, micro_batches, target_logprobs
from rlhf_cluster.tinker.records import AdamParams, Datum, LoraSpec

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
STATE_FILE, META_FILE = "state.safetensors", "meta.json"


def adapter_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """BLAKE3 over an adapter's tensors in name order (each name, dtype, shape and bytes): the same
    tensors give the same digest wherever they are read back (an engine reading the exported file)."""
    h = blake3.blake3()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _seed_of(lora: LoraSpec, model_id: str) -> int:
    """The client's initialisation seed; without one, derived from its id (the same on every rank)."""
    if lora.seed is not None:
        return int(lora.seed)
    return int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:8], "little") >> 1


@dataclass
class _Client:
    lora: LoraSpec
    alpha: float
    trains: list[bool]  # per live parameter: whether this client trains it
    weights: list[torch.Tensor]  # this rank's shards, at max_rank
    grads: list[torch.Tensor | None]
    adam: list[dict[str, Any]] = field(default_factory=list)  # the optimizer's state per parameter
    steps: int = 0

    @property
    def rank(self) -> int:
        return self.lora.rank


class AdapterBank:
    """Tinker training clients over one frozen base model (one learner rank's share), on `device`
    (None: the current CUDA device where there is one, else the CPU)."""

    def __init__(
        self,
        model_path: str,
        *,
        max_rank: int = 32,
        alpha: float = 32.0,
        dtype: torch.dtype = torch.float32,
        max_clients: int = 8,
        micro_tokens: int = 4096,
        fsdp: bool = False,
        split_data: bool = False,
        device: torch.device | None = None,
    ):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer

        self.max_rank, self.alpha, self.max_clients, self.micro_tokens = max_rank, alpha, max_clients, micro_tokens
        self.fsdp, self.split_data = fsdp, fsdp and split_data
        cuda = torch.cuda.is_available()
        self.device = device or (torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
        base = load_causal_lm(model_path, dtype, self.device)
        base.requires_grad_(False)
        present = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
        self.targets = [m for m in ATTN_MODULES + MLP_MODULES if m in present]
        if not self.targets:
            raise ValueError(f"{model_path}: none of {ATTN_MODULES + MLP_MODULES} is a linear layer of this model")
        peft_cfg = PeftLoraConfig(
            r=max_rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; it is only divided (alpha / r)
            lora_dropout=0.0,
            target_modules=self.targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, peft_cfg)
        self._loss_scale = 1.0
        if fsdp:
            self._shard(base)
        self.params = [(n, p) for n, p in self.model.named_parameters() if is_adapter_param(n)]
        self.names = [adapter_file_name(n) for n, _ in self.params]
        self.is_a = [".lora_A." in n for n, _ in self.params]
        self.is_attn = [n.split(".lora_")[0].rsplit(".", 1)[-1] in ATTN_MODULES for n, _ in self.params]
        self.lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.params],
            lr=0.0,
            fused=True if self.fused else None,
            foreach=None if self.fused else True,
        )
        self._clients: dict[str, _Client] = {}

    def _shard(self, base: torch.nn.Module) -> None:
        """FSDP2 as the learner shards: each decoder layer, then the root. FSDP2 averages gradients
        over ranks; with `split_data` the loss is scaled by the world size (`_loss_scale`) so they
        sum (a divide factor of 1 would need PREMUL_SUM, which gloo lacks)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        for layer in decoder_layers(base):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        if self.split_data:
            self._loss_scale = float(dist.get_world_size())

    # ---- clients -------------------------------------------------------------------------------
    def clients(self) -> list[str]:
        return list(self._clients)

    def _client(self, model_id: str) -> _Client:
        if model_id not in self._clients:
            raise KeyError(f"no training client {model_id!r} on this learner")
        return self._clients[model_id]

    def _trains(self, lora: LoraSpec) -> list[bool]:
        return [lora.train_attn if attn else lora.train_mlp for attn in self.is_attn]

    def _check_new(self, model_id: str, lora: LoraSpec) -> None:
        if model_id not in self._clients and len(self._clients) >= self.max_clients:
            raise RuntimeError(
                f"all {self.max_clients} adapter slots are in use (max_clients); one frees when its client is freed"
            )
        if not 1 <= lora.rank <= self.max_rank:
            raise ValueError(f"LoRA rank {lora.rank} is outside 1..{self.max_rank} (this bank's max_rank)")
        if not any(self._trains(lora)):
            raise ValueError("a LoRA client must train the attention or the MLP adapters (train_attn, train_mlp)")

    def create(self, model_id: str, lora: LoraSpec) -> None:
        """A new client: A initialised as peft does (kaiming-uniform, seeded), masked to its rank; B = 0."""
        if model_id in self._clients:
            raise ValueError(f"training client {model_id!r} exists already")
        self._check_new(model_id, lora)
        g = torch.Generator().manual_seed(_seed_of(lora, model_id))
        trains = self._trains(lora)
        weights = []
        for i, (_, p) in enumerate(self.params):
            full = torch.zeros(p.shape, dtype=torch.float32)
            if self.is_a[i] and trains[i]:
                block = torch.empty(lora.rank, p.shape[1])
                torch.nn.init.kaiming_uniform_(block, a=math.sqrt(5), generator=g)
                full[: lora.rank] = block
            weights.append(shards.local(shards.laid_out(full, p)).clone())
        n = len(self.params)
        self._clients[model_id] = _Client(lora, self.alpha, trains, weights, [None] * n, [{} for _ in range(n)])

    def free(self, model_id: str) -> None:
        self._client(model_id)
        del self._clients[model_id]

    # ---- the live adapter ----------------------------------------------------------------------
    @torch.no_grad()
    def _put_weights(self, c: _Client) -> None:
        """The client's tensors into the live adapter, its scale into every LoRA layer."""
        for (_, p), w in zip(self.params, c.weights):
            shards.local(p).copy_(w)
        for layer in self.lora_layers:
            layer.scaling["default"] = c.alpha / c.rank

    def _take_grads(self, c: _Client) -> None:
        """The gradients of the op just run, added to the client's pending ones; the live ones cleared."""
        for i, (_, p) in enumerate(self.params):
            g, p.grad = p.grad, None
            if g is None or not c.trains[i]:
                continue
            g = shards.local(g).clone() if self.fsdp else g  # a shard may view a buffer FSDP2 reuses: owned here
            c.grads[i] = g if c.grads[i] is None else c.grads[i].add_(g)  # type: ignore[union-attr]

    def _micro_batch_count(self, n: int) -> int:
        """Ranks with shares of their own run the same number of micro-batches (each forward gathers
        collectively): the most any rank has."""
        if not self.split_data or dist.get_world_size() == 1:
            return n
        count = torch.tensor([n], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())

    # ---- ops -----------------------------------------------------------------------------------
    def forward_backward(
        self, model_id: str, datums: list[Datum], loss_fn: str, config: Mapping[str, float], backward: bool
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Per datum the log-probs of its `target_tokens` (float32 [N]) and the loss's metrics; with
        `backward` the gradients add to the client's pending ones until its `optim_step`."""
        from rlhf_cluster.tinker.losses import builtin_loss, check_loss

        c = self._client(model_id)
        check_datums(datums, self.vocab_size)
        if datums:  # with split_data a rank may get none of a small batch, and still takes part
            check_loss(loss_fn, config, [d.inputs for d in datums], [d.length for d in datums])
        self._put_weights(c)
        groups = micro_batches([d.length for d in datums], self.micro_tokens)
        outputs: list[np.ndarray] = []
        parts: list[tuple[dict[str, float], int]] = []
        try:  # an error leaves the client as it was: its gradients are taken only at the end
            with torch.set_grad_enabled(backward):
                for k in range(self._micro_batch_count(len(groups))):
                    if k >= len(groups):  # this rank's share ran out: a forward that adds nothing
                        self._idle_micro_batch(backward)
                        continue
                    rows = [datums[i] for i in groups[k]]
                    logprobs = target_logprobs(self.model, rows, self.device)
                    inputs = [datum_inputs(d, self.device) for d in rows]
                    loss, metrics = builtin_loss(loss_fn, logprobs, inputs, config)
                    if backward:
                        (loss * self._loss_scale if self._loss_scale != 1.0 else loss).backward()
                    outputs += [lp.detach().float().cpu().numpy() for lp in logprobs]
                    parts.append((metrics, len(rows)))
            if backward:
                self._take_grads(c)
        finally:
            for _, p in self.params:
                p.grad = None
        return outputs, combine_metrics(parts)

    def _idle_micro_batch(self, backward: bool) -> None:
        one = np.zeros(1, dtype=np.int64)
        (lp,) = target_logprobs(self.model, [Datum(one, {"target_tokens": one})], self.device)
        if backward:
            (lp.sum() * 0.0).backward()

    def optim_step(self, model_id: str, adam: AdamParams) -> dict[str, float]:
        """AdamW with the request's settings over the client's trained parameters (its pending
        gradients, zero where none came), clipped when `grad_clip_norm` > 0; the gradients cleared."""
        c = self._client(model_id)
        self._put_weights(c)
        trained = [i for i in range(len(self.params)) if c.trains[i]]
        live = [self.params[i][1] for i in trained]
        for i, p in zip(trained, live):
            g = c.grads[i]
            p.grad = shards.like_param(g if g is not None else torch.zeros_like(c.weights[i]), p)
            if c.adam[i]:
                self.optimizer.state[p] = c.adam[i]
        try:
            total = torch.nn.utils.get_total_norm([p.grad for p in live if p.grad is not None])
            norm = float(shards.full(total))
            if adam.grad_clip_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(live, adam.grad_clip_norm, total)
            for group in self.optimizer.param_groups:
                betas = (adam.beta1, adam.beta2)
                group.update(lr=adam.learning_rate, betas=betas, eps=adam.eps, weight_decay=adam.weight_decay)
            if math.isfinite(norm):  # a NaN/inf gradient skips the update (the norm is global: every rank alike)
                self.optimizer.step()
                c.steps += 1
            with torch.no_grad():
                for i, p in zip(trained, live):
                    c.adam[i] = self.optimizer.state.pop(p, c.adam[i])
                    c.weights[i].copy_(shards.local(p))
                    c.grads[i] = None
        finally:  # the live adapter and the optimizer keep nothing of the client's, even after an error
            for _, p in self.params:
                p.grad = None
            self.optimizer.state.clear()
        return {"grad_norm:mean": norm, "lr:mean": float(adam.learning_rate)}

    # ---- state, files --------------------------------------------------------------------------
    def _trimmed(self, i: int, t: torch.Tensor, rank: int) -> torch.Tensor:
        """Parameter i's tensor (a local shard or a DTensor) whole, trimmed to `rank`, on the host."""
        full = shards.full(shards.like_param(t, self.params[i][1]) if not isinstance(t, DTensor) else t)
        full = full[:rank] if self.is_a[i] else full[:, :rank]
        return full.detach().to("cpu", copy=True).contiguous()

    def state_dict(self, model_id: str, optimizer: bool) -> dict:
        """What `save` writes: the adapter trimmed to rank r (`adapter/<peft name>`), with `optimizer`
        the Adam state (`exp_avg/`, `exp_avg_sq/`, `step/`), and the client's rank, alpha, steps and
        trained layers. A collective under FSDP (every rank calls; every rank gets it whole)."""
        c = self._client(model_id)
        tensors: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.names):
            if not c.trains[i]:
                continue
            tensors[f"adapter/{name}"] = self._trimmed(i, c.weights[i], c.rank)
            if optimizer and c.adam[i]:
                for key in ("exp_avg", "exp_avg_sq"):
                    tensors[f"{key}/{name}"] = self._trimmed(i, c.adam[i][key], c.rank)
                tensors[f"step/{name}"] = c.adam[i]["step"].detach().to("cpu", torch.float32, copy=True).reshape(1)
        meta = {
            "rank": c.rank,
            "alpha": c.alpha,
            "steps": c.steps if optimizer else 0,
            "train_attn": c.lora.train_attn,
            "train_mlp": c.lora.train_mlp,
            "train_unembed": c.lora.train_unembed,
            "optimizer": optimizer,
        }
        return {"tensors": tensors, **meta}

    def save(self, model_id: str, folder: Path, optimizer: bool) -> None:
        """The client's state as `state.safetensors` + `meta.json`, written atomically (rank 0)."""
        from safetensors.torch import save_file

        state = self.state_dict(model_id, optimizer)
        tensors = state.pop("tensors")

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / STATE_FILE))
            (tmp / META_FILE).write_text(json.dumps(state, indent=1))

        self._write(Path(folder), write)

    def _write(self, folder: Path, write) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_dir_atomic(folder, write)
        if self.fsdp and dist.get_world_size() > 1:
            dist.barrier()  # no rank reads the folder before it is whole

    def load(self, model_id: str, folder: Path, optimizer: bool) -> None:
        """A saved state into client `model_id` (replaced, its pending gradients dropped; or new).
        `optimizer=False` starts its Adam state afresh."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        tensors = load_file(str(folder / STATE_FILE))
        lora = LoraSpec(meta["rank"], None, meta["train_attn"], meta["train_mlp"], meta["train_unembed"])
        self._check_new(model_id, lora)
        trains = self._trains(lora)
        n = len(self.params)
        weights, adam = [], [{} for _ in range(n)]  # type: list[torch.Tensor], list[dict[str, Any]]
        for i, name in enumerate(self.names):
            weights.append(shards.local(self._padded(i, tensors.get(f"adapter/{name}"))).clone())
            if optimizer and trains[i] and f"step/{name}" in tensors:
                adam[i] = {key: self._padded(i, tensors[f"{key}/{name}"]) for key in ("exp_avg", "exp_avg_sq")}
                step = float(tensors[f"step/{name}"].item())
                device = shards.local(self.params[i][1]).device if self.fused else "cpu"
                adam[i]["step"] = torch.tensor(step, dtype=torch.float32, device=device)
        steps = int(meta["steps"]) if optimizer else 0
        self._clients[model_id] = _Client(lora, float(meta["alpha"]), trains, weights, [None] * n, adam, steps)

    def _padded(self, i: int, trimmed: torch.Tensor | None) -> torch.Tensor:
        """A tensor saved at rank r back at max_rank (zeros beyond r; all zeros if absent), in the
        parameter's layout."""
        p = self.params[i][1]
        full = torch.zeros(p.shape, dtype=torch.float32)
        if trimmed is not None:
            if self.is_a[i]:
                full[: trimmed.shape[0]] = trimmed
            else:
                full[:, : trimmed.shape[1]] = trimmed
        return shards.laid_out(full, p)

    def export_adapter(self, model_id: str, folder: Path) -> str:
        """The client's adapter as a peft folder vLLM loads (its trained layers, trimmed to rank r,
        under peft's saved names, and `adapter_config.json`); returns `adapter_digest` of its tensors."""
        from safetensors.torch import save_file

        c = self._client(model_id)
        tensors = {name: self._trimmed(i, c.weights[i], c.rank) for i, name in enumerate(self.names) if c.trains[i]}
        modules = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in tensors})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": 0.0,
            "target_modules": modules,
            "bias": "none",
        }

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))

        self._write(Path(folder), write)
        return adapter_digest(tensors)
