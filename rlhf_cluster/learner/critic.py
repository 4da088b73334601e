"""PPO's critic: a value model trained by its own FSDP2 group with the clipped value loss.

The value model is the reward model's architecture (causal-LM backbone + `Linear(hidden, 1)`)
read at every response position instead of the last token, so it starts either from the policy
(its backbone, a fresh small head) or from a trained reward model (backbone and head).

`ValueLearner` is an `FSDP2Learner` with a different model and step: sharding, AdamW, gradient
clipping with the NaN skip, micro-batching by token budget and the checkpoint files are the
policy learner's, configured by `critic.*` instead of `learner.*`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path
from typing import cast

import torch

from rlhf_cluster.algorithms import value_loss
from rlhf_cluster.config import CriticConfig, JobConfig
from rlhf_cluster.experience.records import TrainBatch
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.learner.micro_batches import MicroBatch
from rlhf_cluster.learner.spec import LearnerSpec, Passes
from rlhf_cluster.models.modeling import attention_of
from rlhf_cluster.models.packing import PackedRows
from rlhf_cluster.models.scalar_head import ScalarHeadModel


class ValueModel(ScalarHeadModel):
    """A reward model's backbone and head applied at every position: per-token values ``[B, T]``.

    The value of response token t is read at the position that predicts it (``prompt_len - 1 + t``):
    V(s_t) is the expected return of the state before token t is chosen, the PPO convention.
    """

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The decoder layers (each is sharded on its own)."""
        return cast(torch.nn.ModuleList, self.backbone.layers)  # an HF decoder's; torch types it Tensor | Module

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_lengths: torch.Tensor,
        response_len: int,
        packing: PackedRows | None = None,
    ) -> torch.Tensor:
        if packing is not None:  # the real tokens only, as the policy learner runs them (`packing`)
            hidden = self.backbone(
                input_ids=packing.input_ids(input_ids),
                position_ids=packing.position_ids,
                attention_mask=packing.attention_mask(*attention_of(self.backbone)),
                use_cache=False,
            ).last_hidden_state
            return self.head(hidden).squeeze(-1).float().reshape(-1)[packing.positions]
        values = self.head(self.hidden_states(input_ids, attention_mask)).squeeze(-1).float()  # [B, L]
        steps = torch.arange(response_len, device=input_ids.device)
        # Positions past a response's end are clamped into range; the caller masks them.
        pos = (prompt_lengths.to(input_ids.device)[:, None] - 1 + steps[None, :]).clamp(max=input_ids.shape[1] - 1)
        return values.gather(1, pos)


class ValueLearner(FSDP2Learner):
    """One rank of the critic group: per-token values of a batch, and clipped-value-loss steps.

    Every method is collective over the critic's process group (FSDP2 all-gathers parameters in
    each forward), so all ranks call it together, each with its own slice of the step's batch.
    """

    trains_policy = False  # the value loss alone: the user's policy loss (algorithm.loss.function) is not imported

    def __init__(self, critic: CriticConfig, spec: LearnerSpec, policy_path: str):
        """`spec`: the critic's own learner settings (`critic_spec`) over the shared FSDP2 machinery."""
        self.critic = critic
        super().__init__(spec, policy_path)

    def _load_model(self, model_path: str) -> torch.nn.Module:
        if self.critic.init == "policy":
            if self.critic.seed is None:
                raise RuntimeError("critic.seed is unset: JobConfig resolves it (from the job's `seed`) first")
            model = ValueModel.from_lm(model_path, seed=self.critic.seed)
        else:
            model = ValueModel.from_pretrained(self.critic.init)
        return model.to(self.device)

    def _attention_implementation(self) -> str:
        return attention_of(self.model.backbone)[0]

    def _values(self, b: TrainBatch, micro: MicroBatch) -> torch.Tensor:
        rows = micro.rows
        return self.model(
            b.input_ids[rows], b.attention_mask[rows], b.prompt_lengths[rows], b.response_mask.shape[1], micro.packing
        )

    @torch.no_grad()
    def values(self, local: TrainBatch) -> torch.Tensor:
        """Per-token values ``[B, T]`` (CPU, fp32) of this rank's samples; garbage past each response's end."""
        b = self._to_device(local)
        self.model.eval()
        out = torch.zeros(b.response_mask.shape, dtype=torch.float32, device=self.device)
        for micro in self._micro_batches(local, 0, b.input_ids.shape[0]):
            values = self._values(b, micro)
            if micro.real:  # a padding pass only keeps the collectives paired
                out[micro.rows] = values.float()
        self.model.train()
        return out.cpu()

    def train_step(self, local: TrainBatch, kl_coef: float = 0.0) -> dict[str, float]:
        """`critic.epochs` optimizer steps of the clipped value loss towards `local.returns`, clipped
        around `local.old_values` (the values the advantages were computed with). The loss is a token
        mean over every rank's valid tokens (one global denominator for all ranks and micro-batches)."""
        del kl_coef  # the policy learner's signature; the value loss has no KL term
        start = time.perf_counter()
        b = self._to_device(local)
        if b.returns is None or b.old_values is None:
            raise ValueError("the critic's train step needs a batch with returns and old_values")
        returns, old_values = b.returns, b.old_values
        mask = b.response_mask
        self.model.train()
        [global_tokens] = self._all_reduce([float(mask.sum())])
        denominator = max(global_tokens, 1.0)
        plan = self._micro_batches(local, 0, mask.shape[0])

        def micro_loss(_mini: int, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
            rows = micro.rows
            return value_loss(
                self._values(b, micro),
                old_values[rows],
                returns[rows],
                mask[rows],
                clip=self.critic.value_clip,
                denominator=denominator,
            )

        passes = self._optimize(self.critic.epochs, [plan], micro_loss)
        return self._step_metrics(passes, returns, old_values, mask, denominator, start)

    def _step_metrics(
        self,
        passes: Passes,
        returns: torch.Tensor,
        old_values: torch.Tensor,
        mask: torch.Tensor,
        denominator: float,
        start: float,
    ) -> dict[str, float]:
        """A step's metrics over every rank's valid tokens (`denominator` of them): the loss, the
        clipped share and the explained variance of the returns by the values the advantages used."""
        loss_sum = sum(epoch[0] for epoch in passes.losses)
        first_loss = passes.losses[0][0]
        clipped_tokens = sum(
            metrics["value_clip_frac"] * float(mask[rows].sum()) for rows, metrics in passes.micro_metrics
        )
        grad_norm, skipped = passes.grad_norm, passes.skipped

        # Explained variance of the returns by the values the advantages used, from global sums:
        # 1 - Var(R - V) / Var(R) over every rank's valid tokens.
        ret, old = returns * mask, old_values * mask
        resid = ret - old
        sums = [
            loss_sum,
            first_loss,
            clipped_tokens,
            float(ret.sum()),
            float(ret.square().sum()),
            float(resid.sum()),
            float(resid.square().sum()),
            float(old.sum()),
        ]
        loss_total, first_total, clipped, r1, r2, d1, d2, v1 = self._all_reduce(sums)
        n = denominator
        epochs = self.critic.epochs
        var_r = r2 / n - (r1 / n) ** 2
        var_d = d2 / n - (d1 / n) ** 2
        return {
            # Each rank's share of the global-denominator loss: the sum over ranks is the loss.
            "critic/value_loss": loss_total / epochs,  # mean over the epochs
            # The first epoch's loss is the error of the values the advantages used: comparable across steps.
            "critic/value_loss_before": first_total,
            "critic/value_clip_frac": clipped / (n * epochs),
            # Constant returns leave nothing to explain: reported as 0 rather than NaN.
            "critic/explained_variance": 1.0 - var_d / var_r if var_r > 1e-12 else 0.0,
            "critic/value_mean": v1 / n,
            "critic/return_mean": r1 / n,
            "critic/grad_norm": grad_norm,
            "critic/skipped_updates": float(skipped),
            "critic/lr": self.scheduler.get_last_lr()[0],
            "critic/step_seconds": time.perf_counter() - start,
        }

    def save_checkpoint(self, directory: str | Path) -> tuple[Future, str]:
        """As the policy learner's, under `directory` (the job checkpoint's `critic/` folder)."""
        (Path(directory) / "rng").mkdir(parents=True, exist_ok=True)
        return super().save_checkpoint(directory)


def critic_spec(cfg: JobConfig) -> tuple[CriticConfig, LearnerSpec]:
    """The critic's section and the learner spec its ranks train with: the critic's lr, clip,
    token budget and seed (`CriticConfig.learner_settings`) with the job's algorithm and sampling."""
    if cfg.critic is None:
        raise ValueError("the critic needs a `critic` section in the job config")
    sampling = cfg.generation.sampling
    return cfg.critic, LearnerSpec(
        cfg.critic.learner_settings(),
        cfg.algorithm,
        sampling.temperature,
        sampling.max_new_tokens,
        longest_row=cfg.generation.max_model_len,
        total_steps=cfg.train.total_steps,
    )
