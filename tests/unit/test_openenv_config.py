"""`generation.agent.environment` (issue 57's adapter): one of `function` and `environment`, the
environment's episodes in the worker's threads, its URL checked; and the adapter's pure parts
(the episode socket's address, the reset seed a group shares, the episode id, the observation as
the user's turn)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rlhf_cluster.config import AgentConfig, OpenEnvEnvironment
from rlhf_cluster.gateway.openenv import EnvironmentProtocolError, episode_of, observation_text, seed_of, ws_url


def test_an_agent_is_a_function_or_an_environment_never_both_or_neither():
    assert AgentConfig(function="m:f").name == "generation.agent.function='m:f'"
    agent = AgentConfig(environment={"type": "openenv", "url": "http://h:8000/"})
    assert agent.environment.url == "http://h:8000" and agent.name == "generation.agent.environment (openenv at http://h:8000)"
    for bad in ({}, {"function": "m:f", "environment": {"url": "http://h:1"}}):
        with pytest.raises(ValidationError, match="set one of `function`"):
            AgentConfig(**bad)
    with pytest.raises(ValidationError, match="isolation: process runs a function"):
        AgentConfig(environment={"url": "http://h:1"}, isolation="process")
    with pytest.raises(ValidationError, match="expected the server's base URL"):
        OpenEnvEnvironment(url="h:8000")


def test_an_agents_returned_reward_counts_unless_the_config_says_how():
    """Trial 23b A1: README says a number the agent returns is its reward, but it is a turn reward and
    `turn_rewards.combine` defaulted to `none`: every agent job's (and OpenEnv environment's) reward
    was dropped without a word. An agent job adds it (`sum`) where its config does not say."""
    from rlhf_cluster.config import JobConfig, load_config

    agent = "generation.agent={function: 'm:run'}"
    assert load_config(None, [agent]).generation.turn_rewards.combine == "sum"
    openenv = load_config(None, ["generation.agent={environment: {url: 'http://h:1'}}"])
    assert openenv.generation.turn_rewards.combine == "sum"
    kept = load_config(None, [agent, "generation.turn_rewards={combine: none, weight: 2}"]).generation.turn_rewards
    assert (kept.combine, kept.weight) == ("none", 2.0)
    assert load_config(None, ["generation.environment=tools"]).generation.turn_rewards.combine == "none"
    recorded = load_config(None, [agent, "generation.turn_rewards.assign=turn"])
    assert JobConfig.model_validate(recorded.model_dump(mode="json")) == recorded  # as config.yaml reads back


def test_the_adapters_pure_parts():
    assert ws_url("http://h:8000") == "ws://h:8000/ws" and ws_url("https://h/env/") == "wss://h/env/ws"
    a, b = [{"role": "user", "content": "2+3?"}], [{"role": "user", "content": "4+4?"}]
    assert seed_of(a) == seed_of([dict(m) for m in a]) != seed_of(b) and 0 <= seed_of(a) < 2**31
    assert episode_of("http://127.0.0.1:9/episodes/train-3:abc:1f2e/v1") == "train-3:abc:1f2e"
    assert observation_text({"question": "2+3", "n": 1}, "question") == "2+3"
    assert observation_text({"n": [1, 2]}, "n") == "[1, 2]" and observation_text({"b": 1, "a": 2}, None) == '{"a": 2, "b": 1}'
    with pytest.raises(EnvironmentProtocolError, match=r"observation_field='q': the observation has \['n'\]"):
        observation_text({"n": 1}, "q")
