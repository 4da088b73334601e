"""What a distillation teacher (`algorithm.distillation.teacher`) must meet: rules between config
sections (`rules`, with preflight's), and a tokenizer that is the policy's (`tokenizer_mismatch`,
checked by preflight where both folders exist and again once the job has built its model)."""

from __future__ import annotations

from pathlib import Path

from rlhf_cluster.config import JobConfig
from rlhf_cluster.config.algorithm import DISTILLED_ADVANTAGES


def rules(cfg: JobConfig) -> list[str]:
    distillation = cfg.algorithm.distillation
    if distillation is None:
        return []
    out = []
    if not cfg.scoring.reference:
        out.append(
            "algorithm.distillation: the teacher pool runs in the reference pool's place; set scoring.reference: true"
        )
    if cfg.learner.lora.enabled:
        out.append(
            "algorithm.distillation with learner.lora: with LoRA the learner's base model is the reference and no "
            "teacher pool runs; train without LoRA"
        )
    kl = cfg.algorithm.kl
    if kl.placement != "none" and kl.coef > 0:
        out.append(
            f"algorithm.distillation with algorithm.kl.coef={kl.coef:g}: the samples' reference log-probs are "
            "the teacher's, so the KL term would pull toward the teacher a second time; set kl.coef: 0 "
            "(or kl.placement: none)"
        )
    if cfg.algorithm.advantage not in DISTILLED_ADVANTAGES:
        out.append(
            f"algorithm.distillation with algorithm.advantage={cfg.algorithm.advantage}: the teacher's per-token "
            f"advantages are made with the group's, for {', '.join(DISTILLED_ADVANTAGES)}"
        )
    return out


def folder_problems(cfg: JobConfig) -> list[str]:
    """The teacher's folder: a model folder, with the policy's tokenizer where the policy's folder exists."""
    distillation = cfg.algorithm.distillation
    if distillation is None:
        return []
    from rlhf_cluster.job.validation import validate_model_dir
    from rlhf_cluster.models.tiny_model import tiny_model_dir

    try:
        validate_model_dir(distillation.teacher)
    except (OSError, ValueError) as exc:
        return [f"algorithm.distillation.teacher: {exc}"]
    policy = cfg.model.path or str(tiny_model_dir(cfg.model.tiny, cfg.model.cache_dir))
    if not Path(policy).is_dir():  # a tiny model not built yet: checked once the job has built it
        return []
    problem = tokenizer_mismatch(policy, distillation.teacher)
    return [problem] if problem else []


def tokenizer_mismatch(policy_dir: str, teacher_dir: str) -> str | None:
    """Why the teacher's tokenizer is not the policy's (its log-probs would score other tokens), or None."""
    from transformers import AutoTokenizer

    policy, teacher = AutoTokenizer.from_pretrained(policy_dir), AutoTokenizer.from_pretrained(teacher_dir)
    if policy.get_vocab() != teacher.get_vocab():
        return (
            f"algorithm.distillation.teacher: the teacher's tokenizer ({teacher_dir}, {len(teacher)} tokens) is not "
            f"the policy's ({policy_dir}, {len(policy)} tokens); a teacher must score the policy's own tokens"
        )
    if policy.eos_token_id != teacher.eos_token_id:
        return (
            f"algorithm.distillation.teacher: the teacher's end-of-sequence token ({teacher.eos_token!r}, "
            f"{teacher_dir}) is not the policy's ({policy.eos_token!r}, {policy_dir})"
        )
    return None
