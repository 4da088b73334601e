"""What the dry run shows before anything starts: the first prompt exactly as the engine will
receive it (after the chat template) with its token count, the prompts the job trains and
evaluates on (and so the steps of `train.total_epochs`), and the bytes one weight sync moves
to each engine, per weight variant. Ray-free; reads the model folder's tokenizer and safetensors
headers only (no weights are loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cluster.config import FunctionReward, JobConfig
from rlhf_cluster.data.chat_template import apply_chat_template, chat_tokenizer
from rlhf_cluster.data.images import describe_images
from rlhf_cluster.data.prompt_files import read_prompts
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.data.tasks import arithmetic_rows
from rlhf_cluster.data.visual_task import VISUAL_TASKS, visual_rows
from rlhf_cluster.job.epochs import prompts_drawn_again, with_epoch_steps
from rlhf_cluster.job.images import image_limits, pixel_limits, prompt_tokens
from rlhf_cluster.job.inputs import PromptSets, prompt_sets
from rlhf_cluster.models.quantization import checkpoint_spec, is_quantized_weight
from rlhf_cluster.models.tiny_model import tiny_model_dir

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_folder(cfg: JobConfig) -> Path | None:
    """The policy's model folder: `model.path`, or the cached tiny model (None before its first build)."""
    if cfg.model.path:
        return Path(cfg.model.path).expanduser()
    tiny = tiny_model_dir(cfg.model.tiny, cfg.model.cache_dir)
    return tiny if (tiny / "config.json").is_file() else None


def first_prompt(cfg: JobConfig, tokenizer=None) -> Prompt:
    """The job's first prompt in file order, templated as the engine will receive it."""
    if cfg.data.path:
        prompt = read_prompts(cfg.data.path, cfg.data.columns, **image_limits(cfg))[0]
    else:
        assert cfg.data.seed is not None  # JobConfig resolves every component seed when it validates
        if cfg.data.task in VISUAL_TASKS:
            row = visual_rows(cfg.data.task, 1, cfg.data.seed, "train", cfg.data.image_size, cfg.data.max_dots)[0]
        else:
            row = arithmetic_rows(1, cfg.data.seed, "train", cfg.data.max_operand)[0]
        prompt = Prompt(row["prompt_id"], row["prompt"], row["answer"], images=tuple(row.get("images", ())))
    if cfg.data.chat_template:
        prompt = apply_chat_template([prompt], tokenizer, cfg.data.system_prompt, cfg.data.chat_template_kwargs)[0]
    return prompt


def sync_bytes(model_path: str | Path, dtype: str, variants: list[str]) -> dict[str, int]:
    """Bytes one weight version moves to an engine of each variant: every tensor in the engine
    dtype (`full`), or linear weights as int8 plus a float32 scale per output row (`int8`)."""
    spec = checkpoint_spec(model_path)
    size = _BYTES[dtype]
    out = {}
    for variant in variants:
        total = 0
        for name, (_, shape) in spec.items():
            numel = int(torch.Size(shape).numel())
            if variant == "int8" and is_quantized_weight(name, torch.empty(shape, device="meta")):
                total += numel + 4 * shape[0]
            else:
                total += numel * size
        out[variant] = total
    return out


@dataclass(frozen=True)
class Preview:
    """The dry run's view of a job's inputs (see the module docstring) and the steps it will train
    (None when `train.total_epochs` is counted only at the start: the model is not built yet)."""

    lines: list[str]
    total_steps: int | None
    warnings: tuple[str, ...] = ()


def preview(cfg: JobConfig) -> Preview:
    """The dry run's view of the job's inputs: its first prompt, reward, prompt counts, weight
    sync bytes and learner memory plan. Raises what the job's start would on its prompts
    (`train.total_epochs` without a step, a prompt too long for `data.overlong_prompts: error`)."""
    folder = model_folder(cfg)
    tokenizer = None
    if folder is not None:
        tokenizer = chat_tokenizer(folder, built_in=cfg.model.path is None)
    if cfg.data.chat_template and tokenizer is None:
        return Preview(
            ["first prompt: the model is not built yet (its tokenizer renders the chat template)"],
            _steps(cfg, _train_prompts(cfg, None)),
        )
    prompt = first_prompt(cfg, tokenizer)
    pixels = pixel_limits(cfg, folder) if folder is not None else (cfg.data.min_pixels, cfg.data.max_pixels)
    count = (
        f"{prompt_tokens(prompt, tokenizer, pixels)} tokens" if tokenizer is not None else "tokens: model not built yet"
    )
    rule = cfg.scoring.rule_source
    scorer = f"function {rule.function}" if isinstance(rule, FunctionReward) else f"verifier {cfg.data.verifier_name}"
    lines = [
        f"first prompt ({prompt.prompt_id}, {count}): {json.dumps(prompt.text)}",
        *([f"first prompt's images: {describe_images(prompt.images, *pixels)}"] if prompt.images else []),
        f"reward: {scorer}"
        + (" + reward models" if cfg.scoring.model_source else "")
        + (" + judge" if cfg.scoring.judge_source else ""),
    ]
    sets = prompt_sets(cfg, cfg.data.path, cfg.data.eval_path, tokenizer, folder) if cfg.data.path and folder else None
    lines.append(prompts_line(cfg, sets))
    judge = cfg.scoring.judge_source
    if judge is not None:
        from rlhf_cluster.scoring.judge import render, render_group

        text = (
            render_group(judge.template, prompt.text, prompt.answer, ["<response 1>", "<response 2>"])
            if judge.group
            else render(judge.template, prompt.text, prompt.answer, "<response>")
        )
        lines.append(f"judge {judge.name!r} ({judge.model}, verdict {judge.verdict}) prompt: {json.dumps(text)}")
    if folder is not None:
        per_variant = sync_bytes(folder, cfg.engine_dtype, cfg.generation.weight_variants)
        lines.append(
            "bytes per weight sync, per engine: "
            + ", ".join(f"{variant} {n / 1e6:.1f} MB" for variant, n in per_variant.items())
        )
        lines.append(learner_memory_line(cfg, folder))
    counted = _train_prompts(cfg, sets)
    drawn_again = prompts_drawn_again(cfg, counted) if counted is not None else None
    return Preview(lines, _steps(cfg, counted), (drawn_again,) if drawn_again else ())


def prompts_line(cfg: JobConfig, sets: PromptSets | None) -> str:
    """The prompts the job trains and evaluates on: a user's file's as its start will select them
    (`sets`: None before the model is built), a built-in task's as `data.num_prompts` asks."""
    d = cfg.data
    if d.path is None:
        return f"prompts: {d.num_prompts} training, {d.eval_prompts} held out (the built-in task {d.task})"
    if sets is None:
        return "prompts: counted at the job's start (the model is not built yet: its tokenizer measures them)"
    dropped = {part: len(record["dropped_ids"]) for part, record in (sets.overlong or {}).items()}

    def too_long(part: str) -> str:
        return f" ({dropped[part]} too long, dropped)" if dropped.get(part) else ""

    line = f"prompts: {len(sets.prompts)} training{too_long('train')}"
    if sets.split is None:
        return line + ", none held out (data.eval_fraction, data.eval_path)"
    held = len(sets.split.held_out)
    chosen = f" (data.eval_prompts={d.eval_prompts})" if d.eval_prompts < held else ""
    return line + f", {held} held out, {len(sets.eval_prompts)} of them evaluated{chosen}{too_long('held_out')}"


def _train_prompts(cfg: JobConfig, sets: PromptSets | None) -> int | None:
    """The prompts the job trains on: a user's file's as selected (`sets`; None before the model is
    built), a built-in task's `data.num_prompts`."""
    if cfg.data.path is None:
        return cfg.data.num_prompts
    return len(sets.prompts) if sets is not None else None


def _steps(cfg: JobConfig, train_prompts: int | None) -> int | None:
    """The steps the job trains: `train.total_steps`, or `train.total_epochs` counted over
    `train_prompts` (None: not counted yet)."""
    if cfg.train.total_epochs is None:
        return cfg.train.total_steps
    if train_prompts is None:
        return None
    return with_epoch_steps(cfg, train_prompts, quiet=True).train.total_steps


def learner_memory_line(cfg: JobConfig, folder: Path) -> str:
    """The learner's memory plan (`learner.memory_plan`) for this model: on this host's GPU where it
    has one, else on an 80 GiB GPU (an H100's, as a reference), per rank."""
    import torch

    from rlhf_cluster.learner.memory_plan import GIB, ModelShape, device_memory_bytes, plan_memory

    lc = cfg.learner
    if torch.cuda.is_available():
        device_bytes, where = device_memory_bytes(torch.device("cuda", 0)), torch.cuda.get_device_name(0)
    else:
        device_bytes, where = 80 * GIB, "an 80 GiB GPU (none here)"
    plan = plan_memory(lc, ModelShape.of_folder(folder), lc.world_size, device_bytes, cfg.generation.max_model_len)
    assert plan.estimate is not None  # a GPU plan always estimates
    return (
        f"memory plan of each learner rank on {where}, {lc.world_size} rank(s): checkpointing "
        f"{'on' if plan.checkpointing else 'off'}, {plan.micro_batch_tokens} tokens per micro-batch, "
        f"estimated {plan.estimate.describe()}; {plan.reason}"
    )
