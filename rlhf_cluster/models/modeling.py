"""Model loading and per-token log-probs of responses, shared by the learner and the reference.

Sequences are prompt+response, right-padded. The log-prob of response token t comes from the
logits at position `prompt_len - 1 + t`; the output is in the response frame [B, T].
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhf_cluster.models import varlen_attention
from rlhf_cluster.models.chunked_logprobs import DEFAULT_CHUNK_TOKENS, scored_positions
from rlhf_cluster.models.packing import PackedRows, pack_rows, packing_pays, prepared_mask
from rlhf_cluster.models.torchvision_ops import ensure_torchvision_importable
from rlhf_cluster.models.varlen_attention import VARLEN
from rlhf_cluster.models.vision import is_vision_folder

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def decoder_layer(name: str) -> str | None:
    """The decoder layer a tensor belongs to (`model.layers.3`), None outside the layers."""
    match = _LAYER.match(name)
    return match.group(1) if match else None


def decoder_layers(model) -> list:
    """A Hugging Face model's decoder layers (what FSDP2 shards one by one): under `.model`, or
    a vision-language model's under `.model.language_model` (its vision blocks are not among them)."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    return list(getattr(inner, "layers", []))


FLEX_FROM_TOKENS = 2048  # `auto` picks FlexAttention on CUDA from responses this long (see choose_attention)


def training_attention(
    choice: str,
    device: torch.device,
    max_new_tokens: int = 0,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    varlen_in_auto: bool = True,
) -> str:
    """The attention a learner's model runs for `learner.attention` on `device`, its compute
    `dtype` and `head_dim` where known: `auto` by `choose_attention` on what is installed here
    (varlen only where `varlen_in_auto`); FlexAttention and varlen refused off CUDA (no backward, no
    kernel), varlen also for a dtype or head size its kernels do not take."""
    if choice == "flex_attention" and device.type != "cuda":
        raise ValueError("learner.attention: flex_attention has no backward on the CPU (PyTorch's): use sdpa or auto")
    if choice == VARLEN:
        if device.type != "cuda":
            raise ValueError("learner.attention: varlen runs PyTorch's flash kernels, CUDA only: use sdpa or auto")
        if not varlen_attention.installed():
            raise ValueError("learner.attention: varlen needs torch.nn.attention.varlen (PyTorch >= 2.10)")
        if dtype is not None and not varlen_attention.runs_for(dtype, head_dim or 8):
            raise ValueError(
                f"learner.attention: varlen's kernels take fp16/bf16 (learner.mixed_precision: bf16) and a head_dim "
                f"that is a multiple of 8 up to 256, not {str(dtype).removeprefix('torch.')} with head_dim {head_dim}"
            )
    if choice != "auto":
        return choice
    varlen = varlen_in_auto and varlen_attention.installed()
    return choose_attention(device.type, flash_attn_installed(), varlen, dtype, head_dim, max_new_tokens)


# Whether `auto` chooses PyTorch's varlen kernels on CUDA: measured ahead of SDPA and FlexAttention at
# every length on one H200 (`make gpu-check`, 2026-11-28, Qwen2.5-0.5B, bf16: 0.168 / 0.176 / 0.336 s at
# the default batch; 0.820 / 2.179 / 1.219 s at 32k tokens per sequence), with tests/gpu's varlen test.
VARLEN_IN_AUTO = True


def choose_attention(
    device_type: str,
    flash_attn: bool,
    varlen: bool,
    dtype: torch.dtype | None,
    head_dim: int | None,
    max_new_tokens: int,
) -> str:
    """`learner.attention: auto`, from the capabilities alone (pure: the tests answer each one).
    On CUDA, the first that runs: flash-attn's varlen kernels where `flash_attn` is installed;
    PyTorch's `varlen_attn` (`varlen`) where this torch has it and its kernels take the compute
    `dtype` and `head_dim` (fp16/bf16, a multiple of 8 up to 256; unknown is no); FlexAttention
    (packed rows under a document mask) when responses may reach `FLEX_FROM_TOKENS`; SDPA below.
    On the CPU, SDPA: FlexAttention has no backward there and the varlen kernels no kernel.
    Measured against SDPA on one H200 (`make gpu-check`, Qwen2.5-0.5B, 16 sequences of 320-1,024
    tokens, or 16,384 tokens per step of longer ones): FlexAttention 0.95x (2026-11-26) and 0.82x
    (2026-11-27) at <= 1k tokens per sequence, 1.22x / 1.19x at 4k, 1.38x / 1.39x at 16k, with less
    memory at every length (29 vs 40 GiB at 16k). varlen, on one H200 (2026-11-28, the same batches,
    32k tokens a step by length): 1.05x SDPA at the default batch, 1.3x at 1k, 1.3x at 4k, 2.2x at 16k
    and 2.7x at 32k tokens per sequence, ahead of FlexAttention at each (1.14x at 4k to 2.0x); `VARLEN_IN_AUTO`
    is the switch that put it there."""
    if device_type != "cuda":
        return "sdpa"
    if flash_attn:
        return "flash_attention_2"
    if VARLEN_IN_AUTO and varlen and varlen_attention.runs_for(dtype, head_dim):
        return VARLEN
    return "flex_attention" if max_new_tokens >= FLEX_FROM_TOKENS else "sdpa"


def learner_attention(choice: str, device: torch.device, max_new_tokens: int, mixed_precision: str, model_path) -> str:
    """`training_attention` for a learner rank: its compute dtype from `learner.mixed_precision`
    (bf16, or the float32 weights) and the head size from the model folder's config, so `auto`
    may choose varlen where its kernels run. A vision-language model's `auto` leaves varlen out: its
    vision tower's bidirectional attention under varlen is tested on the CPU only (a fault there was
    found by one H200 and fixed after it), so it keeps the rule before varlen until a GPU runs it."""
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    vision = is_vision_folder(model_path)
    return training_attention(choice, device, max_new_tokens, dtype, head_dim_of(model_path), not vision)


def head_dim_of(model_path: str | Path) -> int | None:
    """The attention head size of the Hugging Face model in `model_path` (its config.json; the text
    model's where it has one), None where the config does not say: what `training_attention`
    asks about varlen's kernels before the model is loaded."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    text = config.get("text_config", config)
    heads = text.get("num_attention_heads")
    if text.get("head_dim"):
        return int(text["head_dim"])
    return int(text["hidden_size"]) // int(heads) if heads and text.get("hidden_size") else None


def flash_attn_installed() -> bool:
    """Whether the flash-attn package imports here."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def default_attention(cuda: bool) -> str:
    """flash-attn's varlen kernels on CUDA where installed, SDPA otherwise (models loaded without
    a learner's choice: the reference's and the scorers')."""
    return "flash_attention_2" if cuda and flash_attn_installed() else "sdpa"


def load_causal_lm(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention: str | None = None,
):
    """A Hugging Face causal LM from a local folder running `attention` (None: flash-attn on CUDA
    when installed, SDPA otherwise).

    `device="spread"`: over every visible GPU, its layers split between them (accelerate's
    `device_map="auto"`): a frozen scoring model larger than one GPU (the reference design's 70B
    reference on 4 GPUs); one GPU or none is the same as "cuda" / "cpu".

    A vision-language model's folder (`vision.is_vision_folder`) loads as
    `AutoModelForImageTextToText`, torchvision made importable: the same language model with its
    vision tower, which takes a row's images where `response_logprobs` is given them."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model path {folder}: expected a Hugging Face folder with config.json")
    auto = _auto_class(folder)
    attn = attention or default_attention(torch.cuda.is_available())
    if attn == VARLEN:
        varlen_attention.register()
    if device == "spread":
        if torch.cuda.device_count() > 1:
            return auto.from_pretrained(folder, dtype=dtype, attn_implementation=attn, device_map="auto")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = auto.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
    return model.to(device)


def _auto_class(folder: Path):
    """The transformers auto class a model folder loads with: a vision-language model's (its
    vision tower too; torchvision made importable first), else a causal LM's."""
    if is_vision_folder(folder):
        ensure_torchvision_importable()
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def response_positions(
    input_ids: torch.Tensor, prompt_lengths: torch.Tensor, response_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets) [B, T]: position p's output predicts token p+1, so response token t of
    a row is scored at `prompt_len - 1 + t`. The clamp keeps padded positions in range (their
    values are garbage the caller masks)."""
    L = input_ids.shape[1]
    steps = torch.arange(response_len, device=input_ids.device)
    positions = (prompt_lengths.to(input_ids.device)[:, None] - 1 + steps[None, :]).clamp(max=L - 2)
    return positions, input_ids.gather(1, positions + 1)


def attention_of(model) -> tuple[str, torch.dtype]:
    """(attention implementation, compute dtype) of a Hugging Face model, also inside a DeepSpeed
    engine (whose own `config` is its settings)."""
    inner = getattr(model, "module", model)
    return inner.config._attn_implementation, inner.get_input_embeddings().weight.dtype


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    response_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    packed: bool = True,
    packing: PackedRows | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 log-probs [B, T] of the response tokens (and their entropies if asked) under `model`.

    The output layer runs only at the response positions, `chunk_tokens` at a time
    (`chunked_logprobs`): no [tokens, vocab] tensor is ever whole. `packed`: only the rows' real
    tokens run through the model, packed into rows sized for its attention (`packing`), where that
    holds fewer slots than the padded rows (`packing_pays`); `packing` is that layout planned
    already on the host (else it is planned here, reading the lengths back from the device).
    `chunk_tokens=None` is the reference path instead (what issue 35 replaced, kept for the tests
    and the memory benchmark to compare with): the padded rows through the model's full
    [B, L, vocab] logits and one float32 log-softmax; `packed` does not apply to it.
    Positions past a response's end hold garbage (0 where packed: only the responses' real tokens
    are scored there) and must be masked by the caller.
    `inputs`: a vision-language model's extra inputs of the rows' images (`vision.batch_vision_inputs`:
    pixel values, grids, multimodal rotary positions of the padded rows), which are never packed.
    """
    inputs = inputs or {}
    if chunk_tokens is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs).logits
        return _full_logits_logprobs(logits, input_ids, prompt_lengths, response_len, temperature, with_entropy)
    impl, dtype = attention_of(model)
    if packed and not inputs:
        if packing is None:
            packing = pack_rows(input_ids, attention_mask, prompt_lengths, response_len, impl)
        if packing_pays(packing, input_ids.numel()):
            return _packed_logprobs(model, input_ids, packing, (impl, dtype), temperature, with_entropy, chunk_tokens)
    positions, targets = response_positions(input_ids, prompt_lengths, response_len)
    B, L = input_ids.shape
    flat = positions + L * torch.arange(B, device=positions.device)[:, None]
    mask: torch.Tensor | BlockMask = attention_mask
    extra: dict = {}
    if impl == VARLEN:  # each right-padded row one sequence: its real tokens, causal, never see its padding
        cu = torch.arange(B + 1, device=input_ids.device, dtype=torch.int32) * L
        extra = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": L, "max_length_k": L}
    elif not impl.startswith("flash"):  # a ready 4D mask: the model's own mask building reads the device
        keys = attention_mask.bool()
        mask = prepared_mask(keys[:, None, :].expand(B, L, L), impl, dtype)
    only = None if packing is None else packing.scored  # the same [B, T] whether packing paid or not
    with scored_positions(model, flat, targets, temperature, with_entropy, chunk_tokens, only=only) as scored:
        return scored.read(model(input_ids=input_ids, attention_mask=mask, use_cache=False, **extra, **inputs).logits)


def _packed_logprobs(
    model,
    input_ids: torch.Tensor,
    packing: PackedRows,
    attention: tuple[str, torch.dtype],
    temperature: float,
    with_entropy: bool,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`response_logprobs` where packing pays: the rows' real tokens only, packed as `packing` lays
    them out, through `model` running `attention` (its implementation and compute dtype)."""
    packed_ids = packing.input_ids(input_ids)
    with scored_positions(
        model,
        packing.positions,
        packing.targets(packed_ids),
        temperature,
        with_entropy,
        chunk_tokens,
        only=packing.scored,
    ) as scored:
        return scored.read(
            model(
                input_ids=packed_ids,
                position_ids=packing.position_ids,
                attention_mask=packing.attention_mask(*attention),
                use_cache=False,
                **(packing.varlen_kwargs() if attention[0] == VARLEN else {}),
            ).logits
        )


def _full_logits_logprobs(logits, input_ids, prompt_lengths, response_len, temperature, with_entropy):
    """`response_logprobs`' reference path from the model's [B, L, vocab] logits."""
    positions, targets = response_positions(input_ids, prompt_lengths, response_len)
    B = input_ids.shape[0]
    picked = logits.gather(1, positions[:, :, None].expand(B, response_len, logits.shape[-1])).float()
    if temperature != 1.0:
        picked = picked / temperature
    logp_all = picked.log_softmax(-1)
    logprobs = logp_all.gather(-1, targets[:, :, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logprobs, entropy


def sequence_logprobs(model, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [T] of one response under `model` (no grad): the reference an engine's
    per-token log-probs are checked against."""
    seq = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp, _ = response_logprobs(
            model, seq, torch.ones_like(seq), torch.tensor([len(prompt_ids)]), len(response_ids), temperature
        )
    return logp[0]


def tied_output_names(model: torch.nn.Module) -> set[str]:
    """The state-dict names of an output embedding tied to the input embedding (empty if the
    model unties them): an engine ties it itself, so a weight sync need not send it."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", False):
        return set()
    return {name for name in model.state_dict() if name.removeprefix("base_model.model.") == "lm_head.weight"}
