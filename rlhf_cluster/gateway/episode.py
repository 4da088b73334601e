"""One agent episode's exact token trace.

The engine sees one growing token context per episode: the first request's rendered prompt, then
for each model turn its sampled tokens (loss mask 1, their log-probs and weight versions) and the
tokens of the messages the agent added before the next request (mask 0, log-prob 0). A request
must extend the conversation so far: the messages already seen, then the assistant's reply as the
gateway returned it, then new messages. An agent that edits an earlier message (e.g. strips a
`<think>` block) is counted as a history rewrite and the engine's own tokens are kept, so what is
trained on is what the model saw; one that drops or reorders messages is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_cluster.experience.records import FinishReason, Rollout
from rlhf_cluster.gateway.chat import ChatError, continuation_text, render, same_message
from rlhf_cluster.generation.engine import Turn, response_text


class HistoryError(ChatError):
    """A request whose messages do not extend the episode's conversation (HTTP 409)."""


@dataclass
class EpisodeTrace:
    """The token context of one episode, the messages it came from and what it cost."""

    episode_id: str
    budget: int  # response tokens (model and appended) the episode may use, as `sampling.max_new_tokens`
    greedy: bool = False
    prompt_ids: list[int] | None = None
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # (response index, weight version)
    turn_starts: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)  # as the model saw them, its own replies included
    last_turn_text: str = ""  # the last model turn's text with special tokens (where the template's turn end continues)
    rewrites: int = 0  # requests whose earlier messages differed from what the model saw
    rewards: list[float] = field(default_factory=list)  # given by the agent (the runner's return value or the endpoint)
    finish_reason: FinishReason = "stop"
    closed: bool = False

    @property
    def remaining(self) -> int:
        return self.budget - len(self.response_ids)

    def context_for(self, tokenizer, messages: list[dict], tools: list | None) -> list[int]:
        """The engine context for a chat request: the first request rendered whole, a later one
        as the episode so far plus the added messages' tokens (appended here, mask 0)."""
        if self.prompt_ids is None:
            self.prompt_ids = tokenizer(render(tokenizer, messages, tools, True), add_special_tokens=False)["input_ids"]
            self.messages = list(messages)
            return list(self.prompt_ids)
        seen = len(self.messages)
        if len(messages) <= seen or any(a.get("role") != b.get("role") for a, b in zip(messages, self.messages)):
            raise HistoryError(
                f"episode {self.episode_id}: the request's {len(messages)} messages do not extend the "
                f"episode's {seen} (earlier messages dropped or reordered); start a new episode"
            )
        if not all(same_message(a, b) for a, b in zip(messages, self.messages)):
            self.rewrites += 1
        added = list(messages[seen:])
        text = continuation_text(tokenizer, self.last_turn_text, added, tools)
        self.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        self.messages += added
        return self.prompt_ids + self.response_ids

    def context_for_text(self, tokenizer, prompt: str) -> list[int]:
        """The engine context for a completions request: its prompt's tokens the first time; later
        the episode's tokens so far, then the tokens of whatever the prompt adds to their text
        (which it must start with; appended, mask 0)."""
        if self.prompt_ids is None:
            self.prompt_ids = tokenizer(prompt)["input_ids"]
            return list(self.prompt_ids)
        context = self.prompt_ids + self.response_ids
        seen = tokenizer.decode(context, skip_special_tokens=True)
        if not prompt.startswith(seen):
            raise HistoryError(
                f"episode {self.episode_id}: the prompt does not start with the episode's text so far; "
                "start a new episode"
            )
        self.append(tokenizer(prompt[len(seen) :], add_special_tokens=False)["input_ids"])
        return self.prompt_ids + self.response_ids

    def append(self, ids: list[int]) -> None:
        """Tokens the model did not write (template, tool results, user turns), within the budget."""
        ids = ids[: max(self.remaining, 0)]
        self.response_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.loss_mask += [0] * len(ids)

    def add_turn(self, turn: Turn, reply: dict, text_with_specials: str) -> None:
        """A model turn the engine sampled, and the assistant message the agent was sent for it."""
        if turn.token_ids:
            for start, version in turn.spans:  # a version that carries on across turns stays one span
                if not self.spans or version != self.spans[-1][1]:
                    self.spans.append((len(self.response_ids) + start, version))
        self.turn_starts.append(len(self.response_ids))
        self.response_ids += turn.token_ids
        self.logprobs += turn.logprobs
        self.loss_mask += [1] * len(turn.token_ids)
        self.messages.append(reply)
        self.last_turn_text = text_with_specials
        self.finish_reason = turn.finish_reason

    def record(self) -> dict:
        """The episode as one JSON object (what a standalone gateway writes when it is closed)."""
        return {
            "episode_id": self.episode_id,
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
            "loss_mask": self.loss_mask,
            "logprobs": self.logprobs,
            "weight_versions": [list(s) for s in self.spans],
            "turn_starts": self.turn_starts,
            "rewards": self.rewards,
            "history_rewrites": self.rewrites,
            "finish_reason": self.finish_reason,
            "messages": self.messages,
        }

    def to_rollout(
        self, tokenizer, prompt_id: str, group_id: str, sample_id: str, worker: str, version: int
    ) -> Rollout:
        """The episode as a sample: its response interleaves model turns and appended messages."""
        if self.prompt_ids is None or not self.turn_starts:
            raise ValueError(f"episode {self.episode_id}: the agent returned without asking the model for a turn")
        spans = self.spans or [(0, version)]
        turn_rewards = [0.0] * len(self.turn_starts)
        turn_rewards[-1] = float(sum(self.rewards))  # the agent's reward belongs to the episode's last turn
        return Rollout(
            sample_id=sample_id,
            prompt_id=prompt_id,
            group_id=group_id,
            prompt_ids=list(self.prompt_ids),
            response_ids=list(self.response_ids),
            rollout_logprobs=list(self.logprobs),
            policy_version=spans[0][1],
            policy_versions=list(spans),
            finish_reason=self.finish_reason,
            response_text=response_text(tokenizer, self.response_ids),
            worker=worker,
            loss_mask=list(self.loss_mask),
            turn_rewards=turn_rewards,
            turn_starts=list(self.turn_starts),
        )
