"""The built-in tool task: its verifier judges the final turn only, its demonstrations are what the
tool environment would produce, its tokenizer keeps the tags short, and the warm-up on its
episodes trains the model's turns and not the observations."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_cluster.config import TinyModelConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.data.tool_task import (calculator_observation, final_turn, tool_demonstration, tool_demonstrations,
                                         verify_tool_arithmetic)
from rlhf_cluster.generation.environments import ToolEnvironment
from rlhf_cluster.models.tiny_model import ensure_tiny_model, tiny_model_dir
from rlhf_cluster.job.warmup import ensure_warmed_model, warmed_model_dir

PROMPT = Prompt("p", "683+467=", "1150")


def test_verifier_judges_the_final_turn_only():
    episode = '<calculator>683+467</calculator><result name="calculator">1150</result>1150'
    assert verify_tool_arithmetic(episode, "1150") == {"correct": 1.0, "tool_calls": 1.0}
    assert verify_tool_arithmetic("1150", "1150") == {"correct": 1.0, "tool_calls": 0.0}
    # The result is in the episode, but the model's answer after it is wrong.
    assert verify_tool_arithmetic('<calculator>683+467</calculator><result name="calculator">1150</result>1105',
                                  "1150")["correct"] == 0.0
    # A call without an answer after the result is not an answer.
    assert verify_tool_arithmetic('<calculator>683+467</calculator><result name="calculator">1150</result>',
                                  "1150")["correct"] == 0.0
    # After a tool error, the text that follows is the answer.
    assert final_turn('<calculator>683+</calculator><error name="calculator">cannot parse</error> 1150 ') == " 1150 "
    assert verify_tool_arithmetic("1150 and more", "1150")["correct"] == 0.0


def test_demonstrations_are_what_the_environment_answers():
    segments = tool_demonstration(PROMPT, use_tool=True)
    assert [trained for _, trained in segments] == [True, False, True]
    call, observation, answer = (text for text, _ in segments)
    env = ToolEnvironment()
    env.reset(PROMPT)
    step = env.step(call)
    assert step.observation == observation == calculator_observation("683+467") == '<result name="calculator">1150</result>'
    assert not step.done and answer == "1150"
    assert env.step(answer).done  # a turn without a call ends the episode
    assert verify_tool_arithmetic("".join(t for t, _ in segments), PROMPT.answer)["correct"] == 1.0
    assert tool_demonstration(PROMPT, use_tool=False) == [("1150", True)]
    prompts = [Prompt(f"p{i}", f"{i}+{i}=", str(2 * i)) for i in range(400)]
    uses = [len(d) == 3 for d in tool_demonstrations(prompts, seed=0)]
    assert 0.4 < sum(uses) / len(uses) < 0.6
    assert tool_demonstrations(prompts, seed=0) == tool_demonstrations(prompts, seed=0)
    assert tool_demonstrations(prompts, seed=0) != tool_demonstrations(prompts, seed=1)


def test_tool_corpus_tokenizer_keeps_tags_short_and_default_cache_names_stable(tmp_path):
    default = TinyModelConfig()
    # The key of a default-corpus model is what it was before the corpus field existed.
    assert tiny_model_dir(default, tmp_path).name == tiny_model_dir(TinyModelConfig(corpus="arithmetic"), tmp_path).name
    assert tiny_model_dir(TinyModelConfig(corpus="tool_arithmetic"), tmp_path) != tiny_model_dir(default, tmp_path)
    tool_dir = ensure_tiny_model(TinyModelConfig(corpus="tool_arithmetic"), tmp_path)
    tok = AutoTokenizer.from_pretrained(tool_dir)
    call, observation, _ = (text for text, _ in tool_demonstration(PROMPT, use_tool=True))
    assert len(tok(call, add_special_tokens=False)["input_ids"]) == 7 + 6  # 7 characters of `683+467`, 6 of tags
    assert len(tok(observation, add_special_tokens=False)["input_ids"]) <= 4 + 9
    assert tok.decode(tok(observation, add_special_tokens=False)["input_ids"]) == observation


def test_warmup_on_episodes_trains_turns_not_observations(tmp_path):
    base = ensure_tiny_model(TinyModelConfig(corpus="tool_arithmetic"), tmp_path)
    prompts = [Prompt(f"p{i}", f"{100 + i}+{200 + 3 * i}=", str(300 + 4 * i)) for i in range(32)]
    demos = [tool_demonstration(p, use_tool=True) for p in prompts]
    warmed = ensure_warmed_model(base, prompts, steps=40, lr=3e-3, batch_size=16, demonstrations=demos)
    assert warmed != warmed_model_dir(base, prompts, 40, 3e-3, 16, 0)  # the demonstrations are part of the key
    tok = AutoTokenizer.from_pretrained(warmed)

    def logprobs(path) -> tuple[float, float]:
        """Summed log-prob of the model's tokens and of the observation's tokens of the first demo."""
        model = AutoModelForCausalLM.from_pretrained(path)
        ids, trained = tok(prompts[0].text)["input_ids"], []
        for text, is_trained in demos[0]:
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids, trained = ids + piece, trained + [is_trained] * len(piece)
        start = len(ids) - len(trained)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits.log_softmax(-1)[0]
        per_token = [float(logp[start + i - 1, ids[start + i]]) for i in range(len(trained))]
        return (sum(x for x, t in zip(per_token, trained) if t) / sum(trained),
                sum(x for x, t in zip(per_token, trained) if not t) / (len(trained) - sum(trained)))

    model_before, observation_before = logprobs(base)
    model_after, observation_after = logprobs(warmed)
    assert model_after > model_before + 1.0
    # The observation is never a target; what it shares with the turns (digits, `calculator`)
    # may rise a little, but far less than the trained tokens.
    assert observation_after - observation_before < (model_after - model_before) / 2
