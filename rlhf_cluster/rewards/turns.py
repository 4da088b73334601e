"""Per-turn rewards of a multi-turn episode combined with the scoring pool's final reward
(`generation.turn_rewards`): the episode's reward, and the parts it came from as components."""

from __future__ import annotations

from rlhf_cluster.config import TurnRewardsConfig


def combined_reward(
    final: float, components: dict[str, float], turn_rewards: list[float], cfg: TurnRewardsConfig
) -> tuple[float, dict[str, float]]:
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


def turn_returns(episode_reward: float, turn_rewards: list[float], cfg: TurnRewardsConfig) -> list[float]:
    """Each model turn's return (`assign: turn`): what the turns from it on added to the episode's
    reward, discounted by `cfg.gamma` per turn, plus the rest of the episode's reward (the final
    reward and any shaping, earned at the end), discounted from the last turn.

    With gamma 1 the first turn's return is the episode's reward, and a later turn's leaves out what
    the turns before it earned: a turn is credited with what followed it, not with what preceded it.
    """
    weight = cfg.weight if cfg.combine == "weighted" else 1.0
    added = [weight * r for r in turn_rewards]
    rest = episode_reward - sum(added)
    returns: list[float] = []
    running = rest
    for a in reversed(added):
        running = a + cfg.gamma * running if returns else a + running
        returns.append(running)
    return returns[::-1] or [episode_reward]
