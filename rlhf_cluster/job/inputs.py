"""A job's inputs, made ready before any actor starts: the model folder (the tiny demo model and
its supervised warm-up when no model is given), the prompt files and the mismatch probe."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from rlhf_cluster.config import JobConfig
from rlhf_cluster.data.chat_template import apply_chat_template, chat_tokenizer
from rlhf_cluster.data.eval_split import EvalSplit, evaluated, split_by_file, split_by_fraction
from rlhf_cluster.data.placebo import shuffled_images
from rlhf_cluster.data.prompt_files import as_paths, describe, job_prompt_files, read_prompts
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.data.tool_task import tool_demonstrations
from rlhf_cluster.generation.probe import Probe, build_probe
from rlhf_cluster.job.epochs import with_epoch_steps
from rlhf_cluster.job.images import image_limits, pixel_limits, prompt_tokens
from rlhf_cluster.job.teacher import tokenizer_mismatch
from rlhf_cluster.job.vision_warmup import ensure_warmed_vision_model
from rlhf_cluster.job.warmup import ensure_warmed_model
from rlhf_cluster.models.tiny_model import ensure_tiny_model
from rlhf_cluster.run.run_dir import RunDir

log = logging.getLogger(__name__)


@dataclass
class JobInputs:
    """What every pool starts from: version 0's model folder, the prompts, the probe."""

    model_path: str
    prompts: list[Prompt]
    eval_prompts: list[Prompt]
    probe: Probe | None
    tokenizer: object  # the model's tokenizer (templates, lengths, probe; decoding samples.jsonl)


@dataclass(frozen=True)
class CheckedInputs:
    """A job's inputs as far as they are checked before its run directory is opened: the model
    folder (the built-in one built or found cached) and its tokenizer, and a user's file's prompt
    sets (None for a built-in task, whose files are written into the run)."""

    model_path: str
    tokenizer: object
    sets: PromptSets | None


def check_inputs(cfg: JobConfig) -> CheckedInputs:
    """What can refuse a job's inputs, read before anything of the run is touched (an `--overwrite`
    has not yet moved the earlier run aside): a teacher's tokenizer, a user's prompt files (columns,
    lengths: `prompt_sets`) and the steps of `train.total_epochs` over them."""
    model_path = str(cfg.model.path or ensure_tiny_model(cfg.model.tiny, cfg.model.cache_dir))
    if cfg.algorithm.distillation is not None:  # (preflight checked it where the policy's folder existed)
        problem = tokenizer_mismatch(model_path, cfg.algorithm.distillation.teacher)
        if problem:
            raise ValueError(problem)
    # The warm-up keeps it: one for templates, lengths, probe (the built-in model's with a stand-in template).
    tokenizer = chat_tokenizer(model_path, built_in=cfg.model.path is None)
    sets = None
    if cfg.data.path is not None:
        sets = prompt_sets(cfg, cfg.data.path, cfg.data.eval_path, tokenizer, model_path)
        with_epoch_steps(cfg, len(sets.prompts), quiet=True)  # an epoch without a step is refused here
    return CheckedInputs(model_path, tokenizer, sets)


def prepare_inputs(cfg: JobConfig, run_dir: RunDir, checked: CheckedInputs | None = None) -> JobInputs:
    """The job's inputs in its opened run directory (`checked` before it was opened, or now): a
    built-in task's prompt files written, the prompt sets' records, the supervised warm-up; the
    warmed-up model is version 0: the reference, the learner and generation all start there."""
    checked = checked or check_inputs(cfg)
    model_path, tokenizer = checked.model_path, checked.tokenizer
    sets = checked.sets or prompt_sets(cfg, *job_prompt_files(cfg.data, run_dir.root), tokenizer, model_path)
    sets.write(run_dir)
    if cfg.model.sft_warmup_steps:
        model_path = _warm_up(cfg, model_path, sets.prompts)
    return JobInputs(
        model_path, sets.prompts, sets.eval_prompts, build_job_probe(cfg, tokenizer, sets.prompts), tokenizer
    )


@dataclass
class PromptSets:
    """The prompts a job trains and evaluates on, as its engines will receive them, and the records
    their selection leaves in the run directory (`write`)."""

    prompts: list[Prompt]
    eval_prompts: list[Prompt]
    split: EvalSplit | None  # the held-out split of a user's file: data/held_out.json
    overlong: dict | None  # what data.overlong_prompts: drop left out: data/overlong.json

    def write(self, run_dir: RunDir) -> None:
        if self.split is not None:
            self.split.write(run_dir.root / "data" / "held_out.json")
        if self.overlong is not None:  # for audit (like held_out.json)
            (run_dir.root / "data").mkdir(parents=True, exist_ok=True)
            run_dir.write_json("data/overlong.json", self.overlong)  # atomic and fsynced, as the run's other JSON


def prompt_sets(cfg: JobConfig, train_files, eval_files, tokenizer, model_path: str | Path) -> PromptSets:
    """The job's prompt sets from its files (`job_prompt_files`): read, the held-out ones split off
    a user's file, templated with `tokenizer`, and those too long for a full response checked
    (`data.overlong_prompts`). Writes nothing: the job's start and the dry run both read them."""
    columns = cfg.data.columns if cfg.data.path else None
    prompts = read_prompts(train_files, columns, **image_limits(cfg))
    eval_prompts = read_prompts(eval_files, columns, field="data.eval_path", **image_limits(cfg)) if eval_files else []
    split = None
    if cfg.data.path is not None and (cfg.data.eval_fraction or eval_files):
        assert cfg.data.seed is not None  # JobConfig resolves every component seed when it validates
        split = (
            split_by_fraction(prompts, cfg.data.eval_fraction, cfg.data.seed)
            if cfg.data.eval_fraction
            else split_by_file(prompts, eval_prompts, describe(as_paths(eval_files)))
        )
        prompts, eval_prompts = split.train, evaluated(split.held_out, cfg.data.eval_prompts, cfg.data.seed)
    if cfg.data.placebo_images:  # the control: each training prompt shown another's images (never the held-out)
        assert cfg.data.seed is not None  # resolved when the config validates
        prompts, _ = shuffled_images(prompts, cfg.data.seed)
    if cfg.data.chat_template:
        template = (tokenizer, cfg.data.system_prompt, cfg.data.chat_template_kwargs)
        prompts = apply_chat_template(prompts, *template)
        eval_prompts = apply_chat_template(eval_prompts, *template)
    sources = (describe(as_paths(train_files)), describe(as_paths(eval_files or train_files)))
    rooms = _rooms(cfg)
    kept, kept_eval = _fitting(cfg, tokenizer, prompts, eval_prompts, sources, model_path, rooms)
    overlong = None
    if cfg.data.overlong_prompts == "drop":
        overlong = {
            "train": {"limit_tokens": rooms[0], "dropped_ids": _left_out(prompts, kept)},
            "held_out": {"limit_tokens": rooms[1], "dropped_ids": _left_out(eval_prompts, kept_eval)},
        }
    return PromptSets(kept, kept_eval, split, overlong)


def _warm_up(cfg: JobConfig, model_path: str, prompts: list[Prompt]) -> str:
    """The warmed model's folder: a vision-language policy's on its prompts' text alone (the
    answers' form, not the images), the tool task's on episodes (some calling the calculator), the
    others' on answers."""
    m = cfg.model
    common = (model_path, prompts, m.sft_warmup_steps, m.sft_warmup_lr, m.sft_warmup_batch_size, cfg.seed)
    progress = _warmup_progress(m.sft_warmup_steps, cfg.train.progress)
    if any(p.images for p in prompts):
        return str(ensure_warmed_vision_model(*common, (cfg.data.min_pixels, cfg.data.max_pixels), progress))
    demonstrations = tool_demonstrations(prompts, cfg.seed) if cfg.data.task == "tool_arithmetic" else None
    return str(ensure_warmed_model(*common, progress=progress, demonstrations=demonstrations))


def _rooms(cfg: JobConfig) -> tuple[int, int]:
    """The prompt tokens that leave room for a full response: training's, and the held-out evaluation's."""
    answer_tokens = cfg.generation.sampling.max_new_tokens
    eval_tokens = cfg.data.eval_sampling.max_new_tokens
    return (
        cfg.generation.max_model_len - answer_tokens,
        cfg.generation.max_model_len - (eval_tokens or answer_tokens),
    )


def _fitting(
    cfg: JobConfig,
    tokenizer,
    prompts: list[Prompt],
    eval_prompts: list[Prompt],
    sources: tuple[str, str],
    model_path: str | Path,
    rooms: tuple[int, int],
) -> tuple[list[Prompt], list[Prompt]]:
    """The training and held-out prompts that leave room for a full response (`check_prompt_lengths`,
    `data.overlong_prompts`)."""
    pixels, drop = pixel_limits(cfg, model_path), cfg.data.overlong_prompts
    eval_tokens = cfg.data.eval_sampling.max_new_tokens
    answers = "data.eval_sampling.max_new_tokens" if eval_tokens else "generation.sampling.max_new_tokens"
    kept = check_prompt_lengths(prompts, tokenizer, rooms[0], sources[0], pixels, overlong=drop)
    kept_eval = eval_prompts
    if eval_prompts:  # from their own file, or held out of the training one
        kept_eval = check_prompt_lengths(eval_prompts, tokenizer, rooms[1], sources[1], pixels, answers, drop)
    return kept, kept_eval


def _left_out(before: list[Prompt], after: list[Prompt]) -> list[str]:
    kept = {id(p) for p in after}
    return [p.prompt_id for p in before if id(p) not in kept]


def check_prompt_lengths(
    prompts: list[Prompt],
    tokenizer,
    limit: int,
    source: str,
    pixels: tuple[int | None, int | None] = (None, None),
    answers: str = "generation.sampling.max_new_tokens",
    overlong: Literal["error", "drop"] = "error",
) -> list[Prompt]:
    """The prompts that leave room for a full response in the engine's context, their images
    counted as the tokens they expand to (resized within `pixels`: min, max); `answers`: the field
    that bounds the responses (`limit` is max_model_len less it). A longer prompt stops the job here
    (`overlong: error`), or is left out (`drop`: logged once, with the count and the first id; the
    job stops if none is left)."""
    lengths = [prompt_tokens(p, tokenizer, pixels) for p in prompts]
    too_long = [(p.prompt_id, n) for p, n in zip(prompts, lengths) if n > limit]
    if not too_long:
        return prompts
    what = (
        f"prompt file {source}: {len(too_long)} prompt(s) longer than generation.max_model_len - "
        f"{answers} = {limit} tokens (first: {too_long[0][0]!r}, {too_long[0][1]} tokens)"
    )
    kept = [p for p, n in zip(prompts, lengths) if n <= limit]
    if overlong != "drop":
        raise ValueError(f"{what}; raise max_model_len, shorten the prompts or set data.overlong_prompts: drop")
    if not kept:
        raise ValueError(f"{what}: data.overlong_prompts: drop leaves none; raise max_model_len or shorten the prompts")
    log.warning("%s: dropped (data.overlong_prompts: drop), %d left", what, len(kept))
    return kept


def build_job_probe(cfg: JobConfig, tokenizer, prompts: list[Prompt]) -> Probe | None:
    """The job's mismatch probe (None when `generation.probe.sequences` is 0)."""
    if cfg.generation.probe.sequences == 0:
        return None
    if any(p.images for p in prompts):  # its sequences are token ids alone: an image prompt's would lack pixels
        log.info(
            "mismatch probe off: prompts with images (the steps' correction/mismatch_k1 and "
            "correction/mismatch_k3 columns measure it on samples)"
        )
        return None
    return build_probe(prompts, tokenizer, cfg.generation.probe.sequences)


def _warmup_progress(steps: int, show: bool):
    bar = tqdm(total=steps, desc="supervised warm-up", disable=not show, dynamic_ncols=True)

    def update(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step + 1 == steps:
            bar.close()

    return update
