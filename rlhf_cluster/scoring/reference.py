"""Frozen reference model: per-token log-probs of responses for the KL term (optionally on int8 weights)."""

from __future__ import annotations

import logging
import time

import torch

from rlhf_cluster.experience.records import Rollout, pad_sequences, token_budget_batches
from rlhf_cluster.models.modeling import attention_of, load_causal_lm, response_logprobs
from rlhf_cluster.models.packing import pack_rows
from rlhf_cluster.models.quantization import quantize_linears
from rlhf_cluster.models.vision import batch_vision_inputs, is_vision_folder, load_processor
from rlhf_cluster.scoring.batching import CPU_TOKENS, tokens_per_batch

log = logging.getLogger(__name__)


class ReferenceModel:
    """A frozen causal LM scoring responses in batches of at most `max_tokens_per_batch` tokens
    (`auto`: sized by `batching.tokens_per_batch`).

    A vision-language model scores a rollout given its images (`Rollout.images`), processed as
    the engine did: its processor built with the data's `min_pixels` / `max_pixels`."""

    def __init__(
        self,
        model_path: str,
        dtype: torch.dtype = torch.float32,
        temperature: float = 1.0,
        max_tokens_per_batch: int | str = "auto",
        quantization: str = "none",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        # Over every GPU the worker holds (scoring.resources.num_gpus), layers split when more than one.
        self.model = load_causal_lm(model_path, dtype, "spread").eval().requires_grad_(False)
        self.device = self.model.get_input_embeddings().weight.device
        self.processor = load_processor(model_path, min_pixels, max_pixels) if is_vision_folder(model_path) else None
        if quantization == "int8":
            quantize_linears(self.model)
        self.temperature = temperature
        # Sized once the model is loaded: on a GPU by the memory left (`batching`).
        self.max_tokens_per_batch = tokens_per_batch(
            max_tokens_per_batch, self.device, [self.model.config], dtype.itemsize
        )
        self.tokens = 0  # response tokens scored, and the seconds it took (`throughput`)
        self.seconds = 0.0

    @torch.no_grad()
    def logprobs(self, rollouts: list[Rollout]) -> list[list[float]]:
        """Reference log-probs of every rollout's response tokens. A batch that runs out of device
        memory halves the token budget (kept for later calls) and goes again."""
        start = time.perf_counter()
        lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
        out: list[list[float]] = []
        pending = list(token_budget_batches(lengths, self.max_tokens_per_batch))
        while pending:
            idx = pending.pop(0)
            try:
                out.extend(self._score([rollouts[i] for i in idx]))
            except torch.OutOfMemoryError:
                if self.max_tokens_per_batch <= CPU_TOKENS or len(idx) == 1:
                    raise
                self.max_tokens_per_batch //= 2
                torch.cuda.empty_cache()
                log.warning(
                    f"reference forward out of device memory: token budget halved to {self.max_tokens_per_batch}"
                )
                pending = [
                    [idx[j] for j in part]
                    for part in token_budget_batches([lengths[i] for i in idx], self.max_tokens_per_batch)
                ] + pending
        self.tokens += sum(len(r.response_ids) for r in rollouts)
        self.seconds += time.perf_counter() - start
        return out

    def _score(self, batch: list[Rollout]) -> list[list[float]]:
        input_ids, attention_mask, prompt_lengths, T = pad_sequences(
            [r.prompt_ids for r in batch], [r.response_ids for r in batch]
        )
        # Packed on the host copy: the lengths are never read back from the device.
        packing = pack_rows(input_ids, attention_mask, prompt_lengths, T, attention_of(self.model)[0]).to(self.device)
        inputs = self._image_inputs(batch, input_ids, attention_mask)
        logp, _ = response_logprobs(
            self.model,
            input_ids.to(self.device),
            attention_mask.to(self.device),
            prompt_lengths.to(self.device),
            T,
            self.temperature,
            packing=packing,
            inputs=inputs,
        )
        logp = logp.float().cpu()
        return [logp[i, : len(r.response_ids)].tolist() for i, r in enumerate(batch)]

    def _image_inputs(
        self, batch: list[Rollout], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The padded rows' image inputs on the device (`vision.batch_vision_inputs`), None without images."""
        if not any(r.images for r in batch):
            return None
        if self.processor is None:
            raise ValueError("rollouts with images given to a text-only reference model")
        host = batch_vision_inputs(self.model, self.processor, input_ids, attention_mask, [r.images for r in batch])
        return None if host is None else {name: t.to(self.device) for name, t in host.items()}
