"""One agent episode's exact token trace.

The engine sees one growing token context per episode: the first request's rendered prompt, then
for each model turn its sampled tokens (loss mask 1, their log-probs and weight versions) and the
tokens of the messages the agent added before the next request (mask 0, log-prob 0). A request
must extend the conversation so far: the messages already seen, then the assistant's reply as the
gateway returned it, then new messages.

An agent that rewrites its history (edits an earlier message, e.g. strips a `<think>` block;
drops or summarises messages; or a chat template that renders earlier turns differently once new
ones follow) no longer has one token sequence. `generation.agent.samples` decides: `episode`
refuses such a request (HTTP 409, naming the setting); `turn` (and `auto` from the first rewrite
on) renders each request's messages afresh, exactly as the agent sent them, and trains each model
turn as its own sample: its prompt the context the engine saw, its response that turn's tokens
(`TurnRecord`, `to_rollouts`).

A vision-language policy's images (the `image_url` parts of the agent's messages) go to the engine
with the context, one placeholder token each as the template writes them; the engine expands each
to the image's tokens, and the trace keeps the context as the engine saw it (`saw`): the images'
tokens masked out, the images themselves in order (`images`, the rollout's).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, replace

from rlhf_cluster.experience.records import FinishReason, Rollout
from rlhf_cluster.gateway.chat import ChatError, continuation_text, render, same_message
from rlhf_cluster.generation.engine_outputs import Turn, response_text
from rlhf_cluster.generation.image_turns import count_placeholders, expansions, grown, shifted


class HistoryError(ChatError):
    """A request whose messages do not extend the episode's conversation (HTTP 409)."""


@dataclass
class TurnRecord:
    """One model turn as the engine ran it: the context it saw and what it sampled."""

    context: list[int]
    token_ids: list[int]
    logprobs: list[float]
    spans: list[tuple[int, int]]  # (index in token_ids, weight version)
    finish_reason: FinishReason
    images: tuple[bytes, ...] = ()  # the context's, in placeholder order

    def to_rollout(
        self, tokenizer, prompt_id: str, group_id: str, sample_id: str, worker: str, loss_mask: list[int] | None = None
    ) -> Rollout:
        """These tokens as a sample after their context (every token the model's unless `loss_mask`
        says otherwise), on the weight versions of `spans`."""
        return Rollout(
            sample_id=sample_id,
            prompt_id=prompt_id,
            group_id=group_id,
            prompt_ids=list(self.context),
            response_ids=list(self.token_ids),
            rollout_logprobs=list(self.logprobs),
            policy_version=self.spans[0][1],
            policy_versions=list(self.spans),
            finish_reason=self.finish_reason,
            response_text=response_text(tokenizer, self.token_ids),
            worker=worker,
            loss_mask=[1] * len(self.token_ids) if loss_mask is None else list(loss_mask),
            images=tuple(self.images),
        )


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
    samples: str = "auto"  # generation.agent.samples: episode | turn | auto
    per_turn: bool = False  # each model turn its own sample (samples: turn, or auto after a rewrite)
    turns: list[TurnRecord] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)  # the episode's images in placeholder order
    turn_images: tuple[bytes, ...] = ()  # per turn: the images of the request being served
    image_token_id: int | None = None  # the image placeholder token (a vision-language policy)

    @property
    def context_images(self) -> tuple[bytes, ...]:
        """The images of the context `context_for` returned last, in order."""
        return self.turn_images if self.per_turn else tuple(self.images)

    @property
    def remaining(self) -> int:
        if self.per_turn:  # the budget is the model's tokens: what the agent sends is each turn's prompt
            return self.budget - sum(len(t.token_ids) for t in self.turns)
        return self.budget - len(self.response_ids)

    def _fresh(self, tokenizer, messages: list[dict], tools: list | None, images: list[tuple] | None) -> list[int]:
        """A per-turn context: the agent's messages as it sent them, rendered whole."""
        self.per_turn = True
        self.messages = list(messages)
        self.turn_images = tuple(i for m in images or () for i in m)
        return tokenizer(render(tokenizer, messages, tools, True), add_special_tokens=False)["input_ids"]

    def _rewritten(
        self, why: str, tokenizer, messages: list[dict], tools: list | None, images: list[tuple] | None
    ) -> list[int]:
        if self.samples == "episode":
            raise HistoryError(
                f"episode {self.episode_id}: {why}; with generation.agent.samples: episode an episode is one token "
                "sequence, which cannot hold both histories (samples: turn or auto trains each model turn on the "
                "context it saw)"
            )
        self.rewrites += 1
        return self._fresh(tokenizer, messages, tools, images)

    def context_for(
        self, tokenizer, messages: list[dict], tools: list | None, images: list[tuple] | None = None
    ) -> list[int]:
        """The engine context for a chat request: the first request rendered whole, a later one
        as the episode so far plus the added messages' tokens (appended here, mask 0). `images`:
        each message's images (`images.request_images`); those of the context are `context_images`."""
        if self.prompt_ids is None:
            self.prompt_ids = tokenizer(render(tokenizer, messages, tools, True), add_special_tokens=False)["input_ids"]
            self.messages = list(messages)
            self.images = [i for m in images or () for i in m]
            self.per_turn = self.samples == "turn"
            self.turn_images = tuple(self.images)
            return list(self.prompt_ids)
        seen = len(self.messages)
        extends = len(messages) > seen and all(same_message(a, b) for a, b in zip(messages, self.messages))
        if self.per_turn:
            self.rewrites += not extends
            return self._fresh(tokenizer, messages, tools, images)
        if len(messages) <= seen or any(a.get("role") != b.get("role") for a, b in zip(messages, self.messages)):
            why = f"the request's {len(messages)} messages do not extend the episode's {seen} (dropped or reordered)"
            return self._rewritten(why, tokenizer, messages, tools, images)
        if not extends:
            return self._rewritten("the request edits earlier messages", tokenizer, messages, tools, images)
        added = list(messages[seen:])
        try:
            text = continuation_text(tokenizer, self.last_turn_text, added, tools)
        except ChatError as exc:  # the template itself rewrites earlier turns (e.g. drops their reasoning)
            return self._rewritten(str(exc), tokenizer, messages, tools, images)
        kept = self.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        self.messages += added
        new = [i for m in (images or [])[seen:] for i in m]
        self.images += new[: count_placeholders(kept, self.image_token_id)]  # those the budget left a placeholder
        return self.prompt_ids + self.response_ids

    def context_for_text(self, tokenizer, prompt: str) -> list[int]:
        """The engine context for a completions request: its prompt's tokens the first time; later
        the episode's tokens so far, then the tokens of whatever the prompt adds to their text
        (which it must start with; appended, mask 0)."""
        if self.prompt_ids is None:
            self.prompt_ids = tokenizer(prompt)["input_ids"]
            self.per_turn = self.samples == "turn"
            return list(self.prompt_ids)
        # The text so far: per turn, the last turn's context and tokens; else the episode's tokens.
        last = self.turns[-1] if self.per_turn and self.turns else None
        context = last.context + last.token_ids if last is not None else self.prompt_ids + self.response_ids
        seen = tokenizer.decode(context, skip_special_tokens=True)
        extends = prompt.startswith(seen)
        if self.per_turn or not extends:
            if not self.per_turn and self.samples == "episode":
                raise HistoryError(
                    f"episode {self.episode_id}: the prompt does not start with the episode's text so far; with "
                    "generation.agent.samples: episode an episode is one token sequence (samples: turn or auto "
                    "trains each model turn on the context it saw)"
                )
            self.rewrites += not extends
            self.per_turn = True
            return tokenizer(prompt)["input_ids"]
        self.append(tokenizer(prompt[len(seen) :], add_special_tokens=False)["input_ids"])
        return self.prompt_ids + self.response_ids

    def append(self, ids: list[int]) -> list[int]:
        """Tokens the model did not write (template, tool results, user turns), within the
        budget; returns those appended."""
        ids = ids[: max(self.remaining, 0)]
        self.response_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.loss_mask += [0] * len(ids)
        return ids

    def saw(self, sent: list[int], seen: list[int]) -> None:
        """The engine saw `seen` for the context `sent` (`context_for`'s): where it expanded an
        image placeholder to the image's tokens, the trace grows alike (masked out, log-prob 0;
        later indices shifted). A per-turn context is kept by its turn (`add_turn`)."""
        if self.per_turn or sent == seen:
            return
        assert self.prompt_ids is not None  # `context_for` set it
        inserts = expansions(sent, seen, self.image_token_id)
        p = len(self.prompt_ids)
        in_prompt = sum(n for at, n in inserts if at <= p)
        later = [(at - p, n) for at, n in inserts if at > p]
        self.prompt_ids = list(seen[: p + in_prompt])
        self.response_ids = list(seen[p + in_prompt :])
        self.logprobs = grown(self.logprobs, later, 0.0)
        self.loss_mask = grown(self.loss_mask, later, 0)
        self.spans = [(shifted(start, later), v) for start, v in self.spans]
        self.turn_starts = [shifted(start, later) for start in self.turn_starts]

    def add_turn(self, turn: Turn, reply: dict, text_with_specials: str, context: list[int]) -> None:
        """A model turn the engine sampled after `context`, and the assistant message the agent was sent for it."""
        record = TurnRecord(
            list(context), list(turn.token_ids), list(turn.logprobs), list(turn.spans), turn.finish_reason
        )
        self.turns.append(replace(record, images=self.context_images))
        if self.per_turn:
            self.messages.append(reply)
            self.last_turn_text = text_with_specials
            self.finish_reason = turn.finish_reason
            return
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
            "per_turn": self.per_turn,
            "images": [base64.b64encode(i).decode() for i in self.images],
            "turns": [
                {
                    "context": t.context,
                    "token_ids": t.token_ids,
                    "logprobs": t.logprobs,
                    "weight_versions": [list(s) for s in t.spans],
                    "finish_reason": t.finish_reason,
                    "images": len(t.images),
                }
                for t in self.turns
            ],
        }

    def to_rollouts(
        self, tokenizer, prompt_id: str, group_id: str, sample_id: str, worker: str, version: int
    ) -> list[Rollout]:
        """The episode's samples: one (`to_rollout`), or per turn one per model turn, each its
        context and its tokens, sharing the episode (`episode_id` = `sample_id`); the agent's
        reward is on every turn (`turn_rewards`), as the scored reward of its last turn will be."""
        if not self.per_turn:
            return [self.to_rollout(tokenizer, prompt_id, group_id, sample_id, worker, version)]
        if not self.turns:
            raise ValueError(f"episode {self.episode_id}: the agent returned without asking the model for a turn")
        reward = float(sum(self.rewards))
        out = []
        for k, t in enumerate(self.turns):
            spans = [(start, v) for start, v in t.spans if start < len(t.token_ids)] or [(0, version)]
            turn = TurnRecord(t.context, t.token_ids, t.logprobs, spans, t.finish_reason, t.images)
            sample = turn.to_rollout(tokenizer, prompt_id, group_id, f"{sample_id}:t{k}", worker)
            out.append(replace(sample, turn_rewards=[reward], turn_starts=[0], episode_id=sample_id))
        return out

    def to_rollout(
        self, tokenizer, prompt_id: str, group_id: str, sample_id: str, worker: str, version: int
    ) -> Rollout:
        """The episode as a sample: its response interleaves model turns and appended messages."""
        if self.prompt_ids is None or not self.turn_starts:
            raise ValueError(f"episode {self.episode_id}: the agent returned without asking the model for a turn")
        turn_rewards = [0.0] * len(self.turn_starts)
        turn_rewards[-1] = float(sum(self.rewards))  # the agent's reward belongs to the episode's last turn
        spans = self.spans or [(0, version)]
        whole = TurnRecord(
            self.prompt_ids, self.response_ids, self.logprobs, spans, self.finish_reason, tuple(self.images)
        )
        sample = whole.to_rollout(tokenizer, prompt_id, group_id, sample_id, worker, loss_mask=self.loss_mask)
        return replace(sample, turn_rewards=turn_rewards, turn_starts=list(self.turn_starts))
