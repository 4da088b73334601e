"""What an agent job (`generation.agent`), or any job of episodes, must meet: settings that work
together (`rules`) and parser names the installed vLLM has (`file_problems`, checked where vLLM is
importable); preflight runs both."""

from __future__ import annotations

from rlhf_cluster.config import JobConfig


def rules(cfg: JobConfig) -> list[str]:
    agent, out = cfg.generation.agent, []
    if agent is not None and agent.samples == "turn" and cfg.generation.turn_rewards.assign == "turn":
        out.append(
            "generation.agent.samples: turn with generation.turn_rewards.assign: turn: each turn is its own sample "
            "and takes its episode's advantage; set turn_rewards.assign: episode"
        )
    if agent is not None and cfg.data.chat_template_kwargs:
        out.append(
            f"data.chat_template_kwargs: {cfg.data.chat_template_kwargs} would not reach the agent gateway, which "
            "renders each episode's messages with the template's defaults; remove it for an agent job"
        )
    if agent is not None and cfg.data.chat_template and cfg.model.path is None and not cfg.model.tiny.is_vision:
        out.append(
            "data.chat_template: the built-in tiny text model renders prompts with a stand-in template, which the "
            "agent gateway does not render its episodes with; set data.chat_template: false for an agent job on it"
        )
    evaluation = {k: v for k, v in cfg.data.eval_sampling.model_dump().items() if v is not None}
    if evaluation and (agent is not None or cfg.generation.environment):
        out.append(
            f"data.eval_sampling: {evaluation} applies to single-turn generation; an episode's turns (an environment, "
            "an agent) sample with generation.sampling; remove it"
        )
    return out


def file_problems(cfg: JobConfig) -> list[str]:
    # Checked against the installed vLLM's parser registries (imported only for agent jobs).
    agent = cfg.generation.agent
    if agent is None:
        return []
    from rlhf_cluster.gateway.replies import parser_problems

    return parser_problems(agent.tool_parser, agent.reasoning_parser)
