"""Preflight of rollout routing replay (`algorithm.routing_replay: rollout`): what it needs.

Replay takes the experts the generation engine routed each token to and has the learner's
mixture-of-experts layers use them, so it needs a policy with experts and an engine path that
returns them: the rollouts of `submit_group` do (vLLM's own routed experts on a GPU, the engine's
router hook on the CPU); the turns of a multi-turn episode (an environment or an agent) do not.
"""

from __future__ import annotations

from rlhf_cluster.config import JobConfig

_SETTING = "algorithm.routing_replay=rollout"


def rules(cfg: JobConfig) -> list[str]:
    """The config rules (no files read): a dense tiny policy, and episodes whose turns carry no routing."""
    if cfg.algorithm.routing_replay == "none":
        return []
    out = []
    if cfg.model.path is None and not cfg.model.tiny.is_moe:
        out.append(
            f"{_SETTING}: the policy is dense (model.tiny.architecture={cfg.model.tiny.architecture}): replay routes "
            "tokens of a mixture-of-experts model; set model.tiny.architecture: qwen3_moe or routing_replay: none"
        )
    for setting, value in (
        ("generation.environment", cfg.generation.environment),
        ("generation.agent", cfg.generation.agent),
    ):
        if value is not None:
            out.append(
                f"{_SETTING}: {setting} is set, and the engine returns no routed experts for a multi-turn "
                "episode's turns; set routing_replay: none for episodes"
            )
    return out


def file_checks(cfg: JobConfig) -> list[str]:
    """The check that reads `model.path`'s config: a dense model folder is refused, naming it."""
    if cfg.algorithm.routing_replay == "none" or cfg.model.path is None:
        return []
    from rlhf_cluster.models.moe import is_moe

    try:
        moe = is_moe(cfg.model.path)
    except (OSError, ValueError):  # an unreadable folder is `model.path`'s own check's to name
        return []
    if moe:
        return []
    return [
        f"{_SETTING}: model.path {cfg.model.path} is a dense model (its config.json names no experts): replay routes "
        "tokens of a mixture-of-experts model; set routing_replay: none"
    ]
