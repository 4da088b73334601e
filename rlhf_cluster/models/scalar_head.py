"""A reward model: a causal-LM backbone with a scalar head read at the last valid token.

The last valid token is found from the attention mask (lengths), never from token ids, and
position ids are rebuilt from the mask, so the same text scores the same under left or right
padding. Saved as a Hugging Face folder (the backbone) plus ``reward_head.safetensors`` and
``reward_model.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Self

import torch
from safetensors.torch import load_file, save_file

from rlhf_cluster.fileio import write_dir_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HEAD_FILE = "reward_head.safetensors"
MARKER_FILE = "reward_model.json"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last position with mask 1 (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting only valid tokens (0 at each row's first real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class ScalarHeadModel(torch.nn.Module):
    """Backbone (``AutoModel``, no LM head) + ``Linear(hidden, 1)``: built from a causal LM, saved and
    loaded as one folder. What the head is read at is the subclass's `forward`: the last valid token
    (`RewardModel`) or every response position (the critic's `ValueModel`)."""

    def __init__(self, backbone: PreTrainedModel, head: torch.nn.Linear, lm_head: torch.nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Training only (`reward_model.lm_regularization`): the causal LM's own output layer, so the
        # backbone keeps predicting the chosen responses while the head learns to score. Never saved.
        self.lm_head = lm_head

    @classmethod
    def from_lm(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0, keep_lm_head: bool = False
    ) -> Self:
        """A new reward model initialised from a causal LM (or another reward model's backbone);
        `keep_lm_head` also keeps the LM's output layer (the folder must hold a causal LM)."""
        from transformers import AutoModel, AutoModelForCausalLM

        lm_head = None
        if keep_lm_head:
            if (Path(path) / MARKER_FILE).is_file():
                raise ValueError(
                    f"reward_model.lm_regularization needs a causal LM to start from; {path} is a reward model"
                )
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            backbone, lm_head = lm.model, lm.lm_head
        else:
            backbone = AutoModel.from_pretrained(path, dtype=dtype)
        torch.manual_seed(seed)
        head = torch.nn.Linear(backbone.config.hidden_size, 1, dtype=dtype)
        # A small head keeps initial scores near 0, so early pairwise losses are ~log 2.
        torch.nn.init.normal_(head.weight, std=1.0 / (backbone.config.hidden_size + 1))
        torch.nn.init.zeros_(head.bias)
        return cls(backbone, head, lm_head)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> Self:
        """Load a reward model saved by `save_pretrained`; errors name the folder and what is missing."""
        from transformers import AutoModel

        folder = Path(path)
        if not (folder / MARKER_FILE).is_file() or not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(
                f"reward model {folder}: expected {MARKER_FILE} and {HEAD_FILE} (a folder written by `rlhf-cluster "
                "train-rm`)"
            )
        backbone = AutoModel.from_pretrained(folder, dtype=dtype)
        head_state = load_file(str(folder / HEAD_FILE))
        head = torch.nn.Linear(backbone.config.hidden_size, 1, dtype=dtype)
        head.load_state_dict({k: v.to(dtype) for k, v in head_state.items()})
        return cls(backbone, head)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states ``[B, L, H]`` of padded rows, positions counted from the
        mask (`positions_from_mask`), so left and right padding read the same."""
        return self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state

    def save_pretrained(self, path: str | Path, tokenizer=None) -> Path:
        """Write backbone, head, marker (and tokenizer) as one folder, complete or absent."""

        def write(tmp: Path) -> None:
            self.backbone.save_pretrained(tmp, safe_serialization=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp / HEAD_FILE)
            )
            (tmp / MARKER_FILE).write_text(json.dumps({"head": HEAD_FILE, "score": "last valid token"}))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        return write_dir_atomic(path, write)


class RewardModel(ScalarHeadModel):
    """A scalar-head model whose `forward` returns one score per row, read at its last valid token."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lm_rows: int = 0):
        """One score per row; with `lm_rows` > 0 also the LM logits of the first `lm_rows` rows
        (needs the LM head kept by `from_lm(keep_lm_head=True)`)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        last = last_token_index(attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        # A new tensor, not a view of the head's [B, 1] output (`squeeze`, and `float` of float32, make
        # views): FSDP2 hooks the wrapped model's outputs for backward, and an output that is a view
        # loses that hook to any in-place op on it (torch warns "returned a view tensor").
        scores = self.head(picked).squeeze(-1).to(torch.float32, copy=True)
        if not lm_rows:
            return scores
        if self.lm_head is None:
            raise RuntimeError("LM logits asked of a reward model without its LM head (from_lm(keep_lm_head=True))")
        return scores, self.lm_head(hidden[:lm_rows])
