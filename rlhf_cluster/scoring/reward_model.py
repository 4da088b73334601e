"""The reward models a reward worker serves (`FrozenRewardModels`); the model class itself is
`rlhf_cluster.models.scalar_head.RewardModel`."""

from __future__ import annotations

import torch

from rlhf_cluster.experience.records import pad_sequences, token_budget_batches
from rlhf_cluster.models.quantization import quantize_linears
from rlhf_cluster.models.scalar_head import RewardModel
from rlhf_cluster.scoring.batching import tokens_per_batch


class FrozenRewardModels:
    """The reward models a reward worker serves: frozen, optionally on int8 weights, scoring rollouts
    (prompt ids + response ids, as generated) in batches of at most `max_tokens_per_batch` padded tokens."""

    def __init__(
        self,
        specs: list,
        dtype: torch.dtype = torch.float32,
        max_tokens_per_batch: int | str = "auto",
        quantization: str = "none",
    ):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models: dict[str, RewardModel] = {}
        for spec in specs:
            if spec.name in self.models:
                raise ValueError(f"scoring.reward_models: the name {spec.name!r} is used twice")
            model = RewardModel.from_pretrained(spec.path, dtype).to(self.device).eval().requires_grad_(False)
            if quantization == "int8":
                quantize_linears(model)
            self.models[spec.name] = model
        configs = [m.backbone.config for m in self.models.values()]
        self.max_tokens_per_batch = tokens_per_batch(max_tokens_per_batch, self.device, configs, dtype.itemsize)

    @torch.no_grad()
    def score(self, rollouts: list) -> dict[str, list[float]]:
        """Per model name, one score per rollout."""
        out: dict[str, list[float]] = {name: [] for name in self.models}
        lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
        for idx in token_budget_batches(lengths, self.max_tokens_per_batch):
            ids, mask, _, _ = pad_sequences(
                [list(rollouts[i].prompt_ids) for i in idx], [list(rollouts[i].response_ids) for i in idx]
            )
            for name, model in self.models.items():
                out[name].extend(model(ids.to(self.device), mask.to(self.device)).cpu().tolist())
        return out
