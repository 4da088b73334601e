"""The tool demo's episode (configs/tool_demo.yaml) written as an agent against the gateway's
completions endpoint, as a user would port an environment loop: sample a turn that stops after a
calculator call, run the call (the same calculator and +0.1 per call that ran as the demo's
`tools_rewarded` environment), append its result to the text, ask again; at most 3 turns of 16
tokens. Its return value is the episode's tool reward (`turn_rewards.combine: sum` adds it to the
verifier's). `benchmarks/agent_turn_samples.py` trains the demo through it, as one sample per
episode and as one per turn."""

from __future__ import annotations

from openai import OpenAI

from rlhf_cluster.generation.environments import RewardedToolEnvironment

STOP = "</calculator>"


def run(base_url: str, api_key: str, messages: list[dict]) -> float:
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    text, reward = messages[-1]["content"], 0.0
    environment = RewardedToolEnvironment(max_turns=3)
    for _ in range(3):
        choice = client.completions.create(model="policy", prompt=text, max_tokens=16, stop=[STOP]).choices[0]
        turn = choice.text
        if "<calculator>" in turn.rsplit(STOP, 1)[-1]:  # it stopped at the call's end: the model wrote STOP
            turn += STOP
        result = environment.step(turn)
        reward += result.reward
        text += turn + result.observation
        if result.done:  # a turn without a call is the answer
            break
    return reward
