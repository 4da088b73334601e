"""Supervised stages on FSDP2 ranks: SFT of a causal LM, Bradley-Terry training of a reward model.

One `SupervisedTrainer` per rank; the caller has initialised `torch.distributed`. Every rank gets
its share of the step's examples, and the loss denominator (labelled tokens for SFT, pairs for the
reward model) is all-reduced first, so the ranks' summed gradients are the whole batch's. FSDP2
averages gradients over ranks, hence the loss is scaled by the world size (as in the RL learner).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from rlhf_cluster.algorithms import bradley_terry_loss, sft_loss
from rlhf_cluster.config import StageConfig
from rlhf_cluster.data.chat_template import STAND_IN_CHAT_TEMPLATE
from rlhf_cluster.data.sft import IGNORE_INDEX, SFTExample, collate
from rlhf_cluster.fileio import write_dir_atomic
from rlhf_cluster.learner.schedule import lr_multiplier
from rlhf_cluster.models.modeling import load_causal_lm
from rlhf_cluster.models.scalar_head import RewardModel

KINDS = ("sft", "reward_model")


class SupervisedTrainer:
    """One FSDP2 rank of `rlhf-cluster sft` (kind ``sft``) or `rlhf-cluster train-rm` (kind ``reward_model``)."""

    def __init__(self, kind: str, model_path: str, stage: StageConfig, pad_id: int = 0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not dist.is_initialized():
            raise RuntimeError("SupervisedTrainer needs torch.distributed initialised by the caller")
        self.kind, self.stage, self.pad_id = kind, stage, pad_id
        self.world_size = dist.get_world_size()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        if stage.seed is None:
            raise RuntimeError("the stage's seed is unset: JobConfig resolves it (from the job's `seed`) first")
        torch.manual_seed(stage.seed)
        if kind == "sft":
            model = load_causal_lm(model_path, torch.float32, self.device)
            layers = model.model.layers
        else:
            model = RewardModel.from_lm(model_path, seed=stage.seed, keep_lm_head=stage.lm_regularization > 0).to(
                self.device
            )
            layers = model.backbone.layers
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(step, stage.lr_warmup_steps, stage.steps, stage.lr_schedule, stage.min_lr_ratio),
        )

    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _update(self, loss: torch.Tensor) -> float:
        (loss * self.world_size).backward()
        total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.stage.max_grad_norm)
        norm = float(cast(DTensor, total_norm).full_tensor())  # FSDP2's parameters are DTensors, so is their norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _batch(self, examples: list[SFTExample]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(examples, self.pad_id).items()}

    # ---- SFT -----------------------------------------------------------------------------------
    def _sft_forward(self, examples: list[SFTExample], denominator: float):
        b = self._batch(examples)
        logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return sft_loss(logits, b["labels"], denominator=denominator)

    def sft_step(self, examples: list[SFTExample]) -> dict[str, float]:
        """One optimizer step on this rank's examples; the token mean is over all ranks' labelled tokens."""
        self.model.train()
        local = float(sum(lab != IGNORE_INDEX for e in examples for lab in e.labels[1:]))
        [tokens] = self._sum([local])
        loss, metrics = self._sft_forward(examples, max(tokens, 1.0))
        norm = self._update(loss)
        loss_sum, correct = self._sum([float(loss.detach()), metrics["token_accuracy"] * metrics["tokens"]])
        return {"loss": loss_sum, "token_accuracy": correct / max(tokens, 1.0), "tokens": tokens, "grad_norm": norm}

    @torch.no_grad()
    def sft_evaluate(self, examples: list[SFTExample]) -> dict[str, float]:
        """Held-out NLL per labelled token and next-token accuracy (collective)."""
        self.model.eval()
        _, metrics = self._sft_forward(examples, 1.0)
        nll, correct, tokens = self._sum(
            [metrics["nll"] * metrics["tokens"], metrics["token_accuracy"] * metrics["tokens"], metrics["tokens"]]
        )
        return {"eval_nll": nll / max(tokens, 1.0), "eval_token_accuracy": correct / max(tokens, 1.0)}

    # ---- reward model --------------------------------------------------------------------------
    def _scores(self, sequences: list[list[int]]) -> torch.Tensor:
        b = self._batch([SFTExample(s, [IGNORE_INDEX] * len(s)) for s in sequences])
        return self.model(b["input_ids"], b["attention_mask"])

    def rm_step(
        self,
        chosen: list[list[int]],
        rejected: list[list[int]],
        margins: list[float],
        prompt_lengths: list[int] | None = None,
    ) -> dict[str, float]:
        """One optimizer step on this rank's pairs (chosen and rejected in one forward).

        With `reward_model.lm_regularization` > 0 the loss adds that weight times the LM loss on the
        chosen responses (their first `prompt_lengths` tokens are the prompt, not trained on)."""
        self.model.train()
        n, weight = len(chosen), self.stage.lm_regularization
        if weight and (prompt_lengths is None or len(prompt_lengths) != n):
            raise ValueError("reward_model.lm_regularization needs each chosen sequence's prompt length")
        labels = [[IGNORE_INDEX] * len(s) for s in chosen + rejected]
        if weight:  # the chosen responses are labelled for the LM loss (not the prompts, not the rejected)
            assert prompt_lengths is not None  # checked above
            labels[:n] = [[IGNORE_INDEX] * p + c[p:] for c, p in zip(chosen, prompt_lengths)]
        local_tokens = float(sum(lab != IGNORE_INDEX for row in labels[:n] for lab in row[1:]))
        pairs, tokens = self._sum([float(n), local_tokens])
        b = self._batch([SFTExample(s, lab) for s, lab in zip(chosen + rejected, labels)])
        out = self.model(b["input_ids"], b["attention_mask"], lm_rows=n if weight else 0)
        scores = out[0] if weight else out
        margin = torch.tensor(margins, dtype=scores.dtype, device=scores.device) + self.stage.margin
        loss, metrics = bradley_terry_loss(scores[:n], scores[n:], margin, denominator=pairs)
        pairwise, lm_nll = float(loss.detach()), 0.0
        if weight:
            lm_loss, lm_metrics = sft_loss(out[1], b["labels"][:n], denominator=max(tokens, 1.0))
            loss = loss + weight * lm_loss
            lm_nll = lm_metrics["nll"] * lm_metrics["tokens"]
        norm = self._update(loss)
        # `loss` reports the pairwise loss alone (comparable with and without the LM term).
        loss_sum, right, nll_sum = self._sum([pairwise, metrics["accuracy"] * n, lm_nll])
        out_metrics = {
            "loss": loss_sum,
            "accuracy": right / pairs,
            "reward_gap": metrics["reward_gap"],
            "grad_norm": norm,
        }
        if weight:
            out_metrics["lm_nll"] = nll_sum / max(tokens, 1.0)
        return out_metrics

    @torch.no_grad()
    def rm_scores(self, sequences: list[list[int]]) -> list[float]:
        """Scores of this rank's sequences (collective: every rank must call it, with any share)."""
        self.model.eval()
        return self._scores(sequences).tolist() if sequences else self._scores([[self.pad_id]])[:0].tolist()

    # ---- output --------------------------------------------------------------------------------
    def save(self, output: str | Path, tokenizer_path: str | Path, model_path: str | Path) -> str | None:
        """Collective: gather the full weights; rank 0 writes the model folder (atomically)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        if self.kind == "sft":
            if not getattr(tokenizer, "chat_template", None):  # the format the model was fine-tuned on goes with it
                tokenizer.chat_template = STAND_IN_CHAT_TEMPLATE
            model = load_causal_lm(model_path)
            model.load_state_dict(state)

            def write(tmp: Path) -> None:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)

            return str(write_dir_atomic(output, write))
        model = RewardModel.from_lm(model_path)
        # The LM head kept for `lm_regularization` is a training aid: the reward model is backbone + head.
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("lm_head.")})
        return str(model.save_pretrained(output, tokenizer))


def length_correlation(scores: list[float], lengths: list[int]) -> float:
    """Pearson correlation of reward with response length (0 when either is constant)."""
    if len(scores) < 2 or len(set(lengths)) < 2 or len(set(scores)) < 2:
        return 0.0
    return statistics.correlation(scores, [float(x) for x in lengths])
