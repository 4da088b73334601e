"""Per-turn rewards of a multi-turn episode combined with the scoring pool's final reward
(`generation.turn_rewards`): the episode's reward, and the parts it came from as components."""

from __future__ import annotations

from rlhf_cluster.config import TurnRewardsConfig


def combined_reward(final: float, components: dict[str, float], turn_rewards: list[float],
                    cfg: TurnRewardsConfig) -> tuple[float, dict[str, float]]:
    """(reward, components) of an episode whose turns earned `turn_rewards` and whose scoring gave
    `final`: the final reward plus the turns' as `cfg.combine` says, with `turn_reward` (what was
    added) and `final_reward` among the components. `none` (or no turn): `final` as it was."""
    if cfg.combine == "none" or not turn_rewards:
        return final, components
    if cfg.combine == "sum":
        added = sum(turn_rewards)
    elif cfg.combine == "last":
        added = turn_rewards[-1]
    else:  # weighted
        added = cfg.weight * sum(turn_rewards)
    return final + added, {**components, "final_reward": final, "turn_reward": added}
