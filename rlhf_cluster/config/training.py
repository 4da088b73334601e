"""Rank groups that train: the policy learner (FSDP2 | DeepSpeed, LoRA), the critic, and the
supervised stages (SFT, reward model)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal, TypeAlias

from pydantic import Field, model_validator

from rlhf_cluster.config.base import ResourcesConfig, _refuse_renamed, _Strict, _Typed, typed_union


class FSDP2Backend(_Typed):
    """torch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the ranks."""

    type: Literal["fsdp2"] = Field("fsdp2", description="Learner backend kind.")


class DeepSpeedBackend(_Typed):
    """DeepSpeed ZeRO: stage 1 shards optimizer state, 2 also gradients, 3 also parameters."""

    type: Literal["deepspeed"] = Field("deepspeed", description="Learner backend kind.")
    zero_stage: int = Field(
        3, ge=1, le=3, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."
    )
    offload_optimizer: bool = Field(
        False, description="Keep fp32 master weights and optimizer state in CPU memory; torch's AdamW steps them there."
    )
    offload_params: bool = Field(
        False, description="Keep parameter shards in CPU memory between uses (ZeRO stage 3 only)."
    )
    config_file: str | None = Field(
        None,
        description="Your own DeepSpeed JSON, honoured except where the learner owns a setting (batch sizes, "
        "accumulation, clipping, optimizer lr/weight decay, scheduler, precision, ZeRO stage, offload): "
        "those must be absent or agree with the learner config (checked by preflight).",
    )

    @model_validator(mode="after")
    def _offload_params_needs_stage3(self) -> DeepSpeedBackend:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"learner.backend.offload_params needs zero_stage 3 (parameters are only partitioned in stage 3), "
                f"got zero_stage {self.zero_stage}"
            )
        return self


if TYPE_CHECKING:  # the union alone: mypy cannot read the Annotated union typed_union builds at run time
    LearnerBackend: TypeAlias = FSDP2Backend | DeepSpeedBackend
else:
    LearnerBackend = typed_union(FSDP2Backend, DeepSpeedBackend)


class LoraConfig(_Strict):
    """LoRA adapters on the policy (peft): only they are trained, checkpointed and published (alone, or merged)."""

    rank: int = Field(0, ge=0, description="Adapter rank r (0: no LoRA, full fine-tuning).")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input (0 keeps the RL ratios exact).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear layers (by name) that get adapters.",
    )
    sync: Literal["adapters", "merged"] = Field(
        "adapters",
        description="What each version sends to generation: `adapters` (only the adapter matrices; every "
        "engine serves them as a vLLM LoRA adapter, reloaded in place) or `merged` (W + alpha/r B A under the "
        "base model's names: for engines that cannot take adapters, i.e. int8 rollouts and speculative decoding).",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def adapters_only(self) -> bool:
        """Versions reach generation as the adapters alone (engines serve them as a LoRA adapter)."""
        return self.enabled and self.sync == "adapters"


class TrainingGroupConfig(_Strict):
    """What every trained group of ranks (the policy learner, the critic) is sized and optimised by."""

    SECTION: ClassVar[str] = "learner"  # the config section, for messages

    world_size: int = Field(
        1, ge=1, description="Ranks of the group (one torch.distributed group, sized apart from the others)."
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    lr_warmup_steps: int = Field(
        0, ge=0, description="Linear learning-rate warm-up, in learner steps; then `lr_schedule`."
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="After warm-up: `constant` keeps `lr`; `cosine` or `linear` decay it to `lr * min_lr_ratio` at "
        "the last step (`train.total_steps`), as veRL's and OpenRLHF's cosine-with-min-lr do.",
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear: the last step's `lr` as a fraction of it.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0 for RL: KL regularises).")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="Gradient accumulation: forward/backward at most this many tokens at a time (real "
        "tokens when packed, padded ones otherwise; rows dealt so micro-batches balance). None: a whole mini-batch at "
        "once on CPU; on CUDA planned, 16,384 tokens or fewer where the memory plan needs fewer (`memory_fraction`). "
        "The loss denominators stay global, so the update is the same.",
    )
    sequence_packing: bool = Field(
        True,
        description="Run each micro-batch's real tokens only, sequences packed one after another in rows "
        "whose position ids restart per sequence: no padding through the model. With flash-attention all share one "
        "row (varlen kernels); with SDPA or eager attention, rows as wide as the longest sequence, under a "
        "block-diagonal causal mask. False: right-padded rows.",
    )
    seed: int | None = Field(
        None,
        description="Torch seed of every rank (the critic's also seeds its fresh value head; None: the job's `seed`).",
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-rank resources.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        # `warmup_steps` read like the supervised warm-up before RL (model.sft_warmup_steps).
        _refuse_renamed(data, cls.SECTION, {"warmup_steps": "lr_warmup_steps"})
        return data


class LearnerConfig(TrainingGroupConfig):
    """The learner: a group of FSDP2 or DeepSpeed ZeRO ranks."""

    backend: LearnerBackend = Field(
        default_factory=FSDP2Backend,
        description="Training backend, by `type`: fsdp2 (torch fully_shard) or deepspeed "
        "(ZeRO, with its options beside the type). `backend: fsdp2` is short for `backend: {type: fsdp2}`.",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="LoRA on the policy (fsdp2). The reference log-probs then come from the "
        "learner's base model with the adapters disabled, so no reference workers run.",
    )
    freeze_vision: bool = Field(
        True,
        description="A vision-language policy (a folder with a vision_config, e.g. Qwen2.5-VL): true keeps its vision "
        "tower and projector as the folder has them (no gradient, not in the optimizer, never sent to the engines, "
        "which keep the folder's); false trains them with the language model and sends them with every version. "
        "No effect on a text-only model.",
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's batch.")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per epoch: a count (veRL's mini-batch is a size).")
    mixed_precision: Literal["none", "bf16"] = Field(
        "none",
        description="bf16: compute in bf16 (FSDP2: all-gathered bf16 params; DeepSpeed: its bf16 mode), reduce "
        "gradients and keep master weights and optimizer state in fp32.",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in backward (less memory, ~30% more compute). None: planned "
        "(rlhf_cluster/learner/memory_plan.py): on a GPU, on only where the estimated peak without it exceeds "
        "`memory_fraction` of the device; off on CPU.",
    )
    attention: Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "varlen", "eager"] = Field(
        "auto",
        description="The learner model's attention. auto (rlhf_cluster/models/modeling.py, choose_attention): on CUDA "
        "flash_attention_2 where flash-attn is installed, else "
        "varlen where torch has varlen_attn and its kernels take the compute dtype and head size (fp16/bf16, "
        "head_dim a multiple of 8 up to 256), else flex_attention when "
        "generation.sampling.max_new_tokens >= 2048 and SDPA below; SDPA on CPU. varlen (CUDA only): PyTorch's flash "
        "kernels (torch.nn.attention.varlen), a micro-batch's packed sequences in one row, cu_seqlens from the packing "
        "(1.05x SDPA at the default batch, 1.3x at 4k tokens per sequence, 2.7x at 32k, ahead of flex_attention at "
        "each; one H200). flex_attention (CUDA only: no backward on "
        "CPU): packed sequences share one row under a document mask, attention costing each sequence's own length "
        "(1.2x SDPA at 4k tokens per sequence, 1.4x at 16k, 0.82-0.95x at <= 1k, less memory throughout; one H200). "
        "With SDPA and eager attention packed rows are as wide as the longest sequence.",
    )
    compile: bool = Field(
        False,
        description="Regional torch.compile of each decoder layer's forward (inductor: fewer kernel launches and "
        "casts; the first step pays the compilation). With it Liger's kernels are left out (learner.liger_kernels "
        "None) or refused (true): dynamo cannot trace Liger's RMSNorm (torch 2.11, one H200); with Liger off the "
        "compiled layers' gradients equal eager ones on CUDA (benchmarks/gpu/compile_parity.py, tests/gpu) and "
        "on the CPU. Off by default: its speed on a GPU is not yet measured (python3 -m benchmarks.gpu.learner "
        "--compile).",
    )
    liger_kernels: bool | None = Field(
        None,
        description="Liger's Triton kernels for RMSNorm and SwiGLU (the `gpu` extra: liger-kernel). None: on CUDA "
        "where installed; true: required (an error without CUDA or the package); false: off.",
    )
    logprob_head: Literal["auto", "chunked", "fused"] = Field(
        "auto",
        description="How the output layer gives the sampled tokens' log-probs. chunked: a chunk of tokens' logits "
        "at a time, recomputed in backward (any device and dtype). fused: cut-cross-entropy's Triton kernels "
        "(CUDA, the package cut-cross-entropy; an error without either), no [tokens, vocab] logits at all. Where "
        "the kernels cannot serve a case the chunked head runs it, logged once: a gradient through float32 weights "
        "(their backward is bf16/fp16 only: use mixed_precision: bf16), an output layer with a bias, and an entropy "
        "bonus (algorithm.entropy_coef > 0: the kernels give no entropy's gradient); the entropy metric comes from "
        "a Triton kernel of ours, also without logits. auto: fused on CUDA where cut-cross-entropy is installed, "
        "chunked otherwise.",
    )
    sequence_parallel: int = Field(
        1,
        ge=1,
        description="Ranks one long sequence is split over (Ulysses: each rank runs its 1/N of a packed row's "
        "tokens, attention runs on the whole row for heads/N of the heads by an all-to-all, "
        "rlhf_cluster/models/sequence_parallel.py): activations and log-prob memory per rank divided by N, for "
        "sequences longer than one rank's memory holds. Consecutive ranks form world_size / N groups, each "
        "running the same rows, so the batch is dealt over the groups; the update is the same as without it. Must "
        "divide world_size and the model's attention heads; fsdp2 with sequence_packing, without LoRA or compile. "
        "The attention on the whole rows: on CUDA varlen, flash_attention_2 or flex_attention (sdpa, auto's choice "
        "for fp32 weights, is refused when the rank starts: its mask would be dense, P^2 per rank rather than 1/N); "
        "on the CPU also sdpa, its mask [rows, 1, P, P] per rank; never eager.",
    )
    memory_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of each GPU the learner's memory plan may fill (checkpointing and micro-batch tokens, "
        "where not set); the rest is left to colocated engines and the allocator.",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="Torch CPU threads per rank (None: `resources.num_cpus` when it reserves whole cores; "
        "else one for a model under 40 MB of weights, and the node's cores divided among the ranks for a larger one). "
        "Generation and scoring workers run one thread each.",
    )

    # Below this, one thread: a model this small cannot keep two cores busy, and OpenMP's fork
    # and join on every op costs more than it gains. Measured on 2 cores (benchmarks/vs_trl.py
    # workloads): the 0.1M-parameter demo model's learner step took 60-68 ms at one thread and
    # 79-81 ms at two; the 145M model's job step went from 22.6-23.4 s to 17.9-18.7 s with two.
    # Where between them the two meet was not measured; 40 MB is ~10M fp32 parameters.
    SMALL_MODEL_BYTES: ClassVar[int] = 40 << 20

    def cpu_threads_per_rank(self, node_cores: int, weight_bytes: int) -> int:
        """The torch threads each rank computing on CPU runs (`cpu_threads`, resolved for a model
        whose weight files hold `weight_bytes`)."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        if self.resources.num_cpus >= 1:
            return int(self.resources.num_cpus)
        if weight_bytes < self.SMALL_MODEL_BYTES:
            return 1
        return max(1, node_cores // self.world_size)

    @model_validator(mode="after")
    def _sequence_parallel_fits(self) -> LearnerConfig:
        n = self.sequence_parallel
        if self.world_size % n:
            raise ValueError(
                f"learner.sequence_parallel={n} must divide learner.world_size={self.world_size} "
                "(the ranks form world_size / sequence_parallel groups, each sharing its sequences)"
            )
        if n > 1 and self.backend.type != "fsdp2":
            raise ValueError(f"learner.sequence_parallel={n} runs on the fsdp2 backend only, not {self.backend.type}")
        if n > 1 and not self.sequence_packing:
            raise ValueError(f"learner.sequence_parallel={n} splits packed rows: it needs learner.sequence_packing")
        if n > 1 and self.lora.enabled:
            raise ValueError(f"learner.sequence_parallel={n} does not run with LoRA (learner.lora.rank) yet")
        if n > 1 and self.compile:
            raise ValueError(f"learner.sequence_parallel={n} does not run with learner.compile yet (untested)")
        if n > 1 and self.attention == "eager":
            raise ValueError(
                f"learner.sequence_parallel={n} runs the attention through transformers' AttentionInterface, which "
                "eager does not take: set learner.attention to varlen, flash_attention_2 or flex_attention (CUDA), "
                "or sdpa (CPU)"
            )
        return self

    @model_validator(mode="after")
    def _compile_without_liger(self) -> LearnerConfig:
        if self.compile and self.liger_kernels:
            raise ValueError(
                "learner.liger_kernels: true does not run with learner.compile: dynamo cannot trace Liger's RMSNorm "
                "(torch 2.11, one H200; the compiled layers fuse the norms themselves): set one of them false"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _old_deepspeed_section(cls, data: object) -> object:
        # The old spelling `backend: deepspeed` + a separate `deepspeed:` section becomes one typed backend.
        if not isinstance(data, dict) or "deepspeed" not in data:
            return data
        data = dict(data)
        options = data.pop("deepspeed")
        backend = data.get("backend", "fsdp2")
        backend = {"type": backend} if isinstance(backend, str) else backend
        if not isinstance(backend, dict) or backend.get("type") != "deepspeed":
            raise ValueError(
                "learner.deepspeed sets DeepSpeed options but learner.backend is not deepspeed; write them as "
                "learner.backend: {type: deepspeed, ...} (or drop them)"
            )
        if not isinstance(options, dict):
            raise ValueError(f"learner.deepspeed must be a mapping of DeepSpeed options, got {options!r}")
        data["backend"] = {**options, **backend}
        return data


class CriticConfig(TrainingGroupConfig):
    """PPO's learned critic: a value model (causal-LM backbone + scalar head per token) trained by its
    own FSDP2 group with the clipped value loss. Needed by (and only used with) `algorithm.advantage: gae`."""

    SECTION: ClassVar[str] = "critic"

    init: str = Field(
        "policy",
        description="Where the value model starts: `policy` (the policy's backbone, a fresh small head) or "
        "the folder of a reward model written by `rlhf-cluster train-rm` (its backbone and head).",
    )
    value_clip: float | None = Field(
        0.2,
        gt=0,
        description="Clipped value loss: new values may move at most this far from the values the "
        "advantages were computed with before the loss stops pulling them (None: unclipped squared error).",
    )
    epochs: int = Field(
        1,
        ge=1,
        description="Optimizer steps of the critic on each step's batch. The value clip only acts from the "
        "second on: the first starts from exactly the values the advantages used.",
    )
    freeze_policy_steps: int = Field(
        0,
        ge=0,
        description="Critic warm-up: for the job's first this many learner steps (0-based steps 0..N-1, counted "
        "by the job's step, so a resume continues the count) the critic trains on each step's batch as usual and "
        "the policy is not trained: no training pass (only the mismatch probe's forward, as every publish); its "
        "optimizer state (also across a checkpoint taken meanwhile), LR schedule and step count stay, and each "
        "step's version (step + 1) holds its unchanged weights. A fresh value head would otherwise give the policy "
        "noisy GAE advantages from step one. A held step's `kl` is the rollouts' log-probs' against the reference "
        "(engine numerics, sampling filters): the adaptive KL controller does not observe it and "
        "`guardrails.rollback.kl_above` does not act on it. The policy's LR schedule counts its own updates only "
        "(its `learner.lr_warmup_steps` start at its first update; a cosine or linear decay spans "
        "train.total_steps - N steps, ending at the job's last). veRL: `trainer.critic_warmup`; OpenRLHF: "
        "`--freezing_actor_steps`. Not `critic.lr_warmup_steps` (the critic's learning-rate warm-up).",
    )

    def learner_settings(self) -> LearnerConfig:
        """The critic's optimisation settings in the policy learner's terms, so the critic runs the
        same FSDP2 machinery (sharding, AdamW, clipping, micro-batching, checkpoints) with its own values."""
        return LearnerConfig(
            backend=FSDP2Backend(), **{name: getattr(self, name) for name in TrainingGroupConfig.model_fields}
        )


class StageConfig(_Strict):
    """A supervised stage on FSDP2 ranks: `rlhf-cluster sft` (section `sft`) or
    `rlhf-cluster train-rm` (section `reward_model`)."""

    path: str | None = Field(
        None,
        description="Data file (.parquet/.jsonl). sft: prompt + response, or messages (chat template applied). "
        "reward_model: prompt, chosen, rejected (optional margin). Empty: examples generated from the built-in task.",
    )
    num_examples: int = Field(2048, ge=1, description="Built-in task: training examples generated (train pairs only).")
    eval_examples: int = Field(
        64, ge=0, description="Built-in task: held-out examples (held-out pairs), or the last rows of `path`."
    )
    eval_every_steps: int = Field(
        0,
        ge=0,
        description="Also evaluate on the held-out examples every this many steps "
        "(recorded in the stage's history; 0: only after the last step).",
    )
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Examples (sft) or pairs (reward_model) per step, over all ranks.")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="After warm-up: `constant` keeps `lr`; `cosine` or `linear` decay it to `lr * min_lr_ratio` at "
        "the last step, so the model written is the average of a settled run, not one point of a noisy walk.",
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps before the schedule.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear: the last step's `lr` as a fraction of it.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    world_size: int = Field(1, ge=1, description="FSDP2 ranks.")
    margin: float = Field(
        0.0, ge=0, description="reward_model: Bradley-Terry margin added for every pair (plus a row's own `margin`)."
    )
    lm_regularization: float = Field(
        0.0,
        ge=0,
        description="reward_model: weight of an LM loss on the chosen responses, through the starting LM's "
        "own output layer (trained along, not saved), added to the pairwise loss. It keeps the backbone's features "
        "for predicting good responses, so the head does not learn the training pairs by heart (Yang et al. 2024, "
        "'Regularizing hidden states enables learning generalizable reward model'). 0: off.",
    )
    output: str | None = Field(
        None, description="Where the trained model folder goes (default RUN_DIR/sft or RUN_DIR/reward_model)."
    )
    seed: int | None = Field(None, description="Seed of data order and initialisation (None: the job's `seed`).")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-rank resources.")

    @model_validator(mode="after")
    def _batch_fits(self) -> StageConfig:
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by world_size={self.world_size}")
        return self
