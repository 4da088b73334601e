"""What a job starts from: the model (a folder, or the tiny demo model) and the prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rlhf_cluster.config.base import ConfigError, _refuse_renamed, _Strict
from rlhf_cluster.config.generation import SamplingConfig

# The tiny model's mixture-of-experts families; the others are dense and take no MoE field.
MOE_ARCHITECTURES = frozenset({"qwen3_moe"})
# The tiny model's vision-language families (an image encoder before the LM) and their own fields.
VISION_ARCHITECTURES = frozenset({"qwen2_5_vl"})
VISION_FIELDS = frozenset({"vision_layers", "vision_hidden_size", "image_max_pixels"})
MOE_FIELDS = frozenset({"num_experts", "num_experts_per_tok", "moe_intermediate_size"})


class TinyModelConfig(_Strict):
    """Shape of the random model built locally when `model.path` is empty."""

    architecture: Literal["qwen2", "llama", "qwen3_moe", "qwen2_5_vl"] = Field(
        "qwen2",
        description="HF architecture family: `qwen2` or `llama` (dense), `qwen3_moe` (a mixture of experts: "
        "every layer's MLP is `num_experts` experts of width `moe_intermediate_size`, each token routed to "
        "`num_experts_per_tok` of them), or `qwen2_5_vl` (a vision-language model: a Qwen2.5-VL vision tower "
        "of `vision_layers` blocks before the dense LM, saved with its image and video processor).",
    )
    hidden_size: int = Field(64, ge=32, description="Model width.")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(2, ge=1, description="Attention heads; head_dim = hidden/heads must be >= 32 for vLLM CPU.")
    num_kv_heads: int = Field(1, ge=1, description="Key/value heads (GQA).")
    intermediate_size: int = Field(128, ge=8, description="MLP width.")
    vocab_size: int = Field(
        512,
        ge=258,
        description="Upper bound of the byte-level BPE vocabulary (>= 258: 256 bytes + pad + eos); the model gets "
        "exactly the tokenizer size.",
    )
    max_position_embeddings: int = Field(256, ge=32, description="Longest sequence the model accepts.")
    num_experts: int = Field(8, ge=2, description="Experts per MoE layer (`qwen3_moe` only).")
    num_experts_per_tok: int = Field(2, ge=1, description="Experts each token is routed to (`qwen3_moe` only).")
    moe_intermediate_size: int = Field(64, ge=8, description="Each expert's MLP width (`qwen3_moe` only).")
    vision_layers: int = Field(2, ge=1, description="Vision tower blocks (`qwen2_5_vl` only).")
    vision_hidden_size: int = Field(
        64, ge=32, description="Vision tower width, in heads of 32 (`qwen2_5_vl` only; a multiple of 32)."
    )
    image_max_pixels: int = Field(
        112 * 112,
        ge=56 * 56,
        description="Largest image area the processor keeps (`qwen2_5_vl` only): a larger image is resized "
        "down to it; every 28x28 pixels become one image token.",
    )
    corpus: Literal["arithmetic", "tool_arithmetic", "visual"] = Field(
        "arithmetic",
        description="Built-in task whose text the tokenizer is trained on (`tool_arithmetic` adds tool-call "
        "episodes, so the tool tags are a few tokens each; `visual` the visual tasks' questions and answers).",
    )
    initializer_range: float = Field(
        0.02,
        gt=0,
        le=1,
        description="Standard deviation of the random weights (Hugging Face's `initializer_range`). The default "
        "gives near-uniform next-token probabilities; a pretrained model's unembedding is far larger, and a LoRA on "
        "the decoder layers alone (as the Tinker server trains) moves the output only that far: 0.2 gives it room.",
    )
    seed: int = Field(
        0,
        description="Seed of the random initialisation. Not derived from the job's `seed`: the tiny model stands "
        "in for a pretrained checkpoint, which stays the same whatever the job's seed.",
    )

    @model_validator(mode="after")
    def _head_dim(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.hidden_size // self.num_heads < 32:
            raise ValueError("hidden_size / num_heads (head_dim) must be >= 32: vLLM's CPU attention needs it")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok must be at most num_experts")
        if self.vision_hidden_size % 32:
            raise ValueError("vision_hidden_size must be a multiple of 32 (vision heads of 32)")
        return self

    @property
    def is_moe(self) -> bool:
        """Whether the architecture is a mixture of experts (the MoE fields shape it)."""
        return self.architecture in MOE_ARCHITECTURES

    @property
    def is_vision(self) -> bool:
        """Whether the architecture is a vision-language model (the vision fields shape it)."""
        return self.architecture in VISION_ARCHITECTURES


class ModelConfig(_Strict):
    """The policy model: a Hugging Face folder, or a tiny random model built on first use."""

    path: str | None = Field(None, description="HF model folder. Empty: build the tiny model into `cache_dir`.")
    cache_dir: str = Field("~/.cache/rlhf_cluster/models", description="Where built tiny models are cached.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Tiny model shape.")
    sft_warmup_steps: int = Field(
        0, ge=0, description="Supervised warm-up steps on the task's prompts and answers before RL (0: none; cached)."
    )
    sft_warmup_lr: float = Field(3e-3, gt=0, description="Learning rate of the supervised warm-up.")
    sft_warmup_batch_size: int = Field(32, ge=1, description="Batch size of the supervised warm-up.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of generation, scoring and learner compute (fp32 master weights always)."
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        # `warmup_*` read like the learner's LR warm-up; the supervised phase has its own names.
        _refuse_renamed(data, "model", {f"warmup_{k}": f"sft_warmup_{k}" for k in ("steps", "lr", "batch_size")})
        return data


class PromptColumns(_Strict):
    """The names of a prompt file's columns: the prompt text (or a chat `messages` list), the
    reference answer, the id, and what a reward function is given besides. An id or answer column
    left unnamed is used when the file has one named `prompt_id` / `answer` (else ids are `row-<n>`,
    answers empty); a named one must exist. Any name may be a dotted path into a nested (struct)
    column, e.g. `reward_model.ground_truth` in verl's parquet files (`rlhf_cluster/data/nested_columns.py`)."""

    prompt: str = Field("prompt", description="Column of prompt text (ignored when `messages` is set).")
    messages: str | None = Field(
        None,
        description="Column of chat messages (a list of {role, content}) used instead of `prompt`; needs "
        "data.chat_template. A batch reward function then gets TRL's conversational form (TRL: a conversational "
        "dataset's `prompt`): `prompts` these messages, `completions` [{role: assistant, content}] lists.",
    )
    answer: str | None = Field(
        None,
        description="Column of reference answers (None: `answer` if present); a dotted path reads a nested field, "
        "e.g. verl's `reward_model.ground_truth`.",
    )
    prompt_id: str | None = Field(
        None, description="Column of unique ids (None: `prompt_id` if present, else `row-<n>`)."
    )
    source: str | None = Field(
        None,
        description="Column naming each prompt's source (a dataset, a difficulty): "
        "evaluation also reports accuracy per source (`eval_accuracy/<source>`). Unset with several prompt files "
        "(data.path a list): each prompt's source is its file's label (its stem; with its folder where stems clash).",
    )
    images: str | None = Field(
        None,
        description="Column of each prompt's images, one or a list per row (a vision-language policy): PNG/JPEG "
        "bytes, a path (relative to the dataset file's folder), or a `datasets` Image feature ({bytes, path}). The "
        "chat template puts them before the prompt's text (or where a messages column's `{type: image}` parts are).",
    )
    extra: list[str] = Field(
        default_factory=list,
        description="Further columns a custom reward function (`scoring.rewards` `{type: function}`) is given, as its "
        "keyword `extra`: a dict of these columns' values for the response's row (e.g. [test_cases, difficulty]); "
        "beside it, `prompt` (the prompt text), `source` (this `source` column's value) and `prompt_id`. Each must be "
        "a column of the prompt file (and of data.eval_path).",
    )


class EvalSamplingConfig(_Strict):
    """How held-out evaluation samples (`data.eval_samples`), where it differs from training's
    `generation.sampling`: e.g. a model card's recommended temperature 0.6, top_p 0.95 and top_k 20
    for pass@k. Empty fields keep training's; `max_new_tokens` and `repetition_penalty` also apply
    to the greedy answers (top_k, top_p and min_p never change an argmax)."""

    temperature: float | None = Field(None, gt=0, description="Sampled answers' temperature (None: training's).")
    top_p: float | None = Field(None, gt=0, le=1, description="Sampled answers' nucleus (None: training's).")
    top_k: int | None = Field(
        None,
        ge=-1,
        description="Sampled answers' top-k, 0 or -1 for off (None: training's generation.sampling.top_k; veRL "
        "val_kwargs.top_k, slime --eval-top-k).",
    )
    min_p: float | None = Field(None, ge=0, le=1, description="Sampled answers' min_p, 0 for off (None: training's).")
    repetition_penalty: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Every held-out answer's repetition penalty, 1 for off, the greedy ones' too (None: training's).",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Every held-out answer's token limit (None: training's)."
    )

    def over(self, sampling: SamplingConfig) -> SamplingConfig:
        """`sampling` with this section's set fields written over it."""
        return sampling.model_copy(update={k: v for k, v in self.model_dump().items() if v is not None})


class DataConfig(_Strict):
    """Where prompts come from: a built-in task or a user's parquet/jsonl file."""

    task: Literal["arithmetic", "tool_arithmetic", "visual_count", "visual_color"] | None = Field(
        "arithmetic",
        description="Built-in task: writes its parquet file, and its verifier scores responses. "
        "`tool_arithmetic`: the same sums, answered in multi-turn episodes with a calculator tool "
        "(configs/tool_demo.yaml). `visual_count` / `visual_color`: an image of coloured dots, asking how many "
        "there are / what colour they are (a vision-language policy; its `images` column is read without "
        "`columns.images`).",
    )
    path: str | list[str] | None = Field(
        None,
        description="The user's prompts: a .parquet or .jsonl file, or a folder written by `datasets.save_to_disk` "
        "(its columns named by `columns`), or a list of them read as one prompt set in the listed order (veRL's "
        "`data.train_files`): every file has the `columns`; positional ids are `<label>/row-<n>` (the label: the "
        "stem; a shared stem gets its folder's name, `gsm8k/train`); a `prompt_id` in two files is refused; "
        "without `columns.source`, each prompt's source is that label (per-file eval accuracy). One file (or a "
        "list of one) reads as before; keep a list as it is across a resume. Set: the built-in task writes "
        "nothing (its verifier still scores, unless `verifier` says otherwise).",
    )
    columns: PromptColumns = Field(
        default_factory=lambda: PromptColumns(), description="Which columns of `path` hold what."
    )
    chat_template: bool = Field(
        False,
        description="Put each prompt through the model tokenizer's chat template as a user turn (after "
        "`system_prompt`), with the generation prompt added; the engine receives exactly those token ids. The "
        "built-in tiny text model, which has none, renders with the stand-in template `rlhf-cluster sft` uses.",
    )
    system_prompt: str | None = Field(None, description="A system turn before every prompt (with `chat_template`).")
    chat_template_kwargs: dict[str, object] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the chat template (with `chat_template`), e.g. "
        "`{enable_thinking: false}` for Qwen3; each must be a variable the template reads.",
    )
    overlong_prompts: Literal["error", "drop"] = Field(
        "error",
        description="A prompt that leaves no room for a full response (generation.max_model_len less the "
        "answers' max_new_tokens): `error` stops the job; `drop` leaves it out of the training (or held-out) "
        "prompts, logged and listed in <run_dir>/data/overlong.json.",
    )
    verifier: (
        Literal["arithmetic", "tool_arithmetic", "visual_count", "visual_color", "gsm8k", "boxed", "exact", "regex"]
        | None
    ) = Field(
        None,
        description="Built-in verifier scoring responses against the answer column (rlhf_cluster/data/verifiers.py); "
        "None: the task's (arithmetic).",
    )
    verifier_pattern: str | None = Field(
        None, description="`regex` verifier: the pattern (group 1, if any, is the answer)."
    )
    num_prompts: int = Field(2048, ge=1, description="Prompts generated for the built-in task.")
    max_operand: int = Field(
        49, ge=1, le=999, description="Built-in arithmetic task: operands are drawn from 0..max_operand."
    )
    image_size: int = Field(
        56, ge=28, le=448, description="Built-in visual tasks: the images' side in pixels (square)."
    )
    max_dots: int = Field(5, ge=1, le=12, description="Built-in visual tasks: each image has 1..max_dots dots.")
    max_pixels: int | None = Field(
        None,
        ge=784,
        description="Images: the most pixels the model's processor resizes an image to (fewer image tokens); None: "
        "the processor's own setting.",
    )
    min_pixels: int | None = Field(
        None, ge=1, description="Images: the fewest pixels the processor resizes an image to; None: its own setting."
    )
    max_images_per_prompt: int = Field(
        4,
        ge=1,
        le=64,
        description="Images: the most a prompt (or an agent's episode) carries; the engines are sized for it "
        "(vLLM's `limit_mm_per_prompt`); a prompt file with more in a row is refused, naming the row.",
    )
    max_image_bytes: int = Field(
        16 * 2**20,
        ge=1,
        description="Images: an encoded image larger than this (bytes) is refused, naming its row and file.",
    )
    placebo_images: bool = Field(
        False,
        description="A control: each training prompt is shown another prompt's images (a seeded permutation among "
        "prompts with as many images); held-out prompts keep theirs. Learning that survives it is not reading images.",
    )
    eval_prompts: int = Field(
        64,
        ge=0,
        le=256,
        description="Held-out prompts of the built-in task (disjoint from train); with the user's "
        "data, at most this many of the held-out prompts (a seeded choice) are evaluated each time.",
    )
    eval_path: str | list[str] | None = Field(
        None,
        description="Held-out prompts of the user's data: a file or folder as `path` takes, or a list of them read "
        "as one as `path` reads its list (veRL's `data.val_files`), with the same `columns`. Training prompts that "
        "repeat one of them are dropped from training.",
    )
    eval_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Hold out this fraction of `path`'s distinct prompts (all its files' together; a seeded split by "
        "content: a prompt repeated under another id stays on one side), never trained on; the held-out ids are "
        "written to <run_dir>/data/held_out.json. 0: no split.",
    )
    eval_samples: int = Field(
        8,
        ge=0,
        description="Held-out evaluation also samples this many responses per prompt at the training "
        "temperature: their mean correctness is the policy's expected accuracy, far less noisy than greedy (0: greedy "
        "only).",
    )
    eval_every_steps: int = Field(
        0,
        ge=0,
        description="Also evaluate on the held-out prompts after every this many steps (0: only before and "
        "after the job); the results are columns of that step's row in metrics.jsonl (after the last step: eval.json).",
    )
    eval_sampling: EvalSamplingConfig = Field(
        default_factory=EvalSamplingConfig,
        description="Sampling of the held-out answers where it differs from training's (temperature, top_p, "
        "top_k, min_p, repetition_penalty, max_new_tokens); single-turn generation only.",
    )
    eval_pass_k: list[int] = Field(
        default_factory=lambda: [1, 4],
        description="pass@k reported for each k (unbiased estimator over the "
        "eval_samples sampled answers per prompt; each k <= eval_samples).",
    )
    seed: int | None = Field(None, description="Seed for task generation and prompt order (None: the job's `seed`).")
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded).")

    @field_validator("path", "eval_path")
    @classmethod
    def _file_list(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        where = f"data.{info.field_name}"
        if isinstance(value, list):
            if not value:
                raise ValueError(f"{where}: an empty list; name at least one prompt file (or leave it unset)")
            for i, item in enumerate(value):
                if not item.strip():
                    raise ValueError(f"{where}[{i}]: an empty path")
                if item in value[:i]:
                    raise ValueError(f"{where}[{i}]: {item} is listed twice (also {where}[{value.index(item)}])")
        return value

    @model_validator(mode="after")
    def _verifier_and_template(self) -> DataConfig:
        for name in ("eval_path", "eval_fraction"):
            if getattr(self, name) and self.path is None:
                raise ValueError(
                    f"data.{name} holds out part of the user's prompts (data.path), which is not set; the "
                    "built-in task writes its own held-out prompts (data.eval_prompts)"
                )
        if self.columns.extra and self.path is None:
            raise ValueError(
                f"data.columns.extra: {self.columns.extra} names columns of the prompt file (data.path), which is not "
                "set; a built-in task's prompts have no other columns"
            )
        if self.eval_path is not None and self.eval_fraction:
            raise ValueError("data.eval_path and data.eval_fraction both name held-out prompts; set one of them")
        if self.eval_samples and any(not 1 <= k <= self.eval_samples for k in self.eval_pass_k):
            raise ValueError(
                f"data.eval_pass_k: each k must be between 1 and data.eval_samples={self.eval_samples}, "
                f"got {self.eval_pass_k}"
            )
        if self.verifier == "regex" and not self.verifier_pattern:
            raise ValueError("data.verifier_pattern: the regex verifier needs a pattern, e.g. 'answer: (\\S+)'")
        if self.verifier_pattern is not None and self.verifier != "regex":
            raise ValueError(
                f"data.verifier_pattern is set but data.verifier is {self.verifier!r}; set verifier: regex"
            )
        if self.columns.messages is not None and not self.chat_template:
            raise ValueError(
                "data.columns.messages: a messages column is rendered with the model's chat template; "
                "set data.chat_template: true"
            )
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("data.system_prompt is a chat turn: set data.chat_template: true")
        if self.chat_template_kwargs and not self.chat_template:
            raise ValueError("data.chat_template_kwargs are the chat template's: set data.chat_template: true")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"data.min_pixels={self.min_pixels} is larger than data.max_pixels={self.max_pixels}")
        return self

    @property
    def verifier_name(self) -> str | None:
        """The verifier that scores responses: `verifier`, else the built-in task's."""
        return self.verifier or self.task

    @property
    def conversational(self) -> bool:
        """The prompts are chats read from a messages column (`columns.messages` of the user's
        `path`): batch reward functions get TRL's conversational form (message lists, not strings)."""
        return self.path is not None and self.columns.messages is not None


def folder_max_length(folder: str | Path) -> int | None:
    """The longest sequence a model folder's config.json accepts (`max_position_embeddings`, at its
    top or in its `text_config`); None when it does not say (ConfigError: no JSON there)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model folder {folder}: its config.json does not read as JSON ({exc})") from None
    sections = [config, config.get("text_config")] if isinstance(config, dict) else []
    for section in sections:
        if isinstance(section, dict) and isinstance(section.get("max_position_embeddings"), int):
            return int(section["max_position_embeddings"])
    return None
