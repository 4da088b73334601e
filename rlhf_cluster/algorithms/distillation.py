"""On-policy distillation: the student samples, a frozen teacher scores every sampled token, and
each token's advantage is its negative reverse KL to the teacher (Agarwal et al. 2024's GKD with
student samples; Thinking Machines' "on-policy distillation", 2025):

    A_t = coef * (log pi_teacher(y_t | y_<t) - log pi_student(y_t | y_<t))

with the student's log-prob the one its engine sampled with (the rollout's): a per-token reward
of -(the reverse-KL estimate at that token), no discount, every token its own. The learner's
importance-corrected policy gradient then pulls each sampled token's probability toward the
teacher's: up where the teacher likes it more, down where less. Where the group also has task
rewards (`mix_with_rewards`), their group advantage is added on every token.
"""

from __future__ import annotations

import torch


def distillation_advantages(
    student_logprobs: list[list[float]],
    teacher_logprobs: list[list[float]],
    coef: float,
    loss_masks: list[list[int] | None] | None = None,
) -> tuple[list[list[float]], dict[str, float]]:
    """Per-token advantages of each response (tokens an environment wrote, mask 0, get 0) and
    metrics: the mean per-token reverse KL estimate (`distill/reverse_kl`, over the model's
    tokens) and the teacher's mean log-prob of them (`distill/teacher_logprob`)."""
    if len(student_logprobs) != len(teacher_logprobs):
        raise ValueError(f"{len(student_logprobs)} student responses, {len(teacher_logprobs)} teacher ones")
    masks = loss_masks or [None] * len(student_logprobs)
    out: list[list[float]] = []
    kl_sum, teacher_sum, tokens = 0.0, 0.0, 0
    for i, (student, teacher, mask) in enumerate(zip(student_logprobs, teacher_logprobs, masks)):
        if len(student) != len(teacher):
            raise ValueError(f"response {i}: {len(student)} student log-probs, {len(teacher)} teacher ones")
        s = torch.tensor(student, dtype=torch.float64)
        t = torch.tensor(teacher, dtype=torch.float64)
        m = torch.ones_like(s) if mask is None else torch.tensor(mask, dtype=torch.float64)
        gap = (s - t) * m  # the reverse-KL estimate at each model token
        out.append((-coef * gap).tolist())
        kl_sum += float(gap.sum())
        teacher_sum += float((t * m).sum())
        tokens += int(m.sum())
    metrics = {
        "distill/reverse_kl": kl_sum / tokens if tokens else 0.0,
        "distill/teacher_logprob": teacher_sum / tokens if tokens else 0.0,
    }
    return out, metrics
