"""Admission control (DESIGN: versions and staleness): how many prompt groups may start now, and which.

Generation may run ahead of the learner by at most `max_staleness` versions: a new group starts
only while `groups started - groups given back <= (version + max_staleness + 1) * prompts_per_step
+ oversample_groups`. A group is given back when it is dropped (stale, or without signal under
dynamic sampling), so the producer generates another in its place and no step goes short.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, deque

from rlhf_cluster.config import GenerationConfig, TrainConfig
from rlhf_cluster.data.prompts import Prompt, PromptSource


def _columns_digest(prompt: Prompt) -> str | None:
    """A digest of a prompt's source and extra columns and its row's own messages (None without
    any), kept in a checkpoint in their place: they need not be JSON values (`data.columns.extra`
    as pyarrow reads them). Without messages it is what checkpoints before them kept."""
    if prompt.source is None and not prompt.extra and prompt.conversation is None:
        return None
    kept = (
        (prompt.source, prompt.extra)
        if prompt.conversation is None
        else (prompt.source, prompt.extra, prompt.conversation)
    )
    return hashlib.blake2b(repr(kept).encode(), digest_size=16).hexdigest()


class Admission:
    """The producer's ledger: the prompt order, the prompts taken but not yet buffered, the counts
    admission control compares against the learner's version. Ray-free and unit-testable."""

    def __init__(self, train: TrainConfig, generation: GenerationConfig, source: PromptSource):
        self.train, self.generation, self.source = train, generation, source
        self.pending: deque[Prompt] = deque()  # taken from the source by an earlier run, not yet generated
        self.in_flight: dict[int, list[Prompt]] = {}
        self.started = 0
        self.given_back = 0
        self.skipping: Counter[str] = Counter()  # prompts whose groups a resume recovered: not generated again
        self._keys = itertools.count()

    def allowance(self, published_version: int) -> int:
        """Prompt groups that may start now."""
        t = self.train
        limit = (published_version + t.max_staleness + 1) * t.prompts_per_step + t.oversample_groups
        return limit - (self.started - self.given_back)

    def requests_per_worker(self) -> int:
        """Requests the producer keeps in flight per generation worker."""
        g = self.generation
        if g.mode == "streaming":
            # One group per request: enough to fill the engine's batch (admission bounds the total).
            return max(1, g.max_num_seqs // g.sampling.n)
        return 2  # batched: one request decodes while the other returns

    def may_start(self, published_version: int, requests_in_flight: int, workers: int) -> bool:
        return self.allowance(published_version) > 0 and requests_in_flight < self.requests_per_worker() * workers

    def admit(self, published_version: int) -> tuple[int, list[Prompt]]:
        """Take the next request's prompts (one group when streaming, up to `prompts_per_request`
        when batched, never more than the allowance); returns its key and the prompts."""
        per_request = self.generation.prompts_per_request if self.generation.mode == "batched" else 1
        k = min(per_request, self.allowance(published_version))
        if k <= 0:
            raise RuntimeError("admit() called without an allowance")
        self.started += k
        prompts = [self._next_prompt() for _ in range(k)]
        key = next(self._keys)
        self.in_flight[key] = prompts
        return key, prompts

    def _next_prompt(self) -> Prompt:
        while True:
            prompt = self.pending.popleft() if self.pending else self.source.next_prompt()
            if not self.skipping[prompt.prompt_id]:
                return prompt
            self.skipping[prompt.prompt_id] -= 1

    def skip(self, prompt_id: str) -> None:
        """The next time `prompt_id` comes up, pass over it (a resume recovered its scored group)."""
        self.skipping[prompt_id] += 1

    def buffered(self, key: int) -> None:
        """The request's groups reached the buffer (or were dropped and given back)."""
        self.in_flight.pop(key)

    def give_back(self, groups: int) -> None:
        """Groups dropped after they were admitted: admission lets as many start again."""
        self.given_back += groups

    def state_dict(self) -> dict:
        pending = list(self.pending) + [p for ps in self.in_flight.values() for p in ps]
        # Prompts taken from the source but not yet in the buffer are generated again on resume.
        return {
            "source": self.source.state_dict(),
            "pending_prompts": [
                [p.prompt_id, p.text, p.answer, list(p.token_ids) if p.token_ids else None, _columns_digest(p)]
                for p in pending
            ],
        }

    def _pending_prompt(
        self, prompt_id: str, text: str, answer: str, token_ids: list[int] | None = None, columns: str | None = None
    ) -> Prompt:
        """A pending prompt of a checkpoint: the source's own where it still holds it unchanged (its
        images, messages, source and extra columns come with it: the state keeps only the text
        fields and a digest of the others). Where its text changed since (another chat template or
        its settings) but its answer, source, extra columns and messages did not (`columns`, the digest), the
        checkpoint's prompt with them, so a reward function reading `extra` still finds them (and the
        row's own messages, a batch function's `prompts`); not its images or rendered messages, which
        the checkpoint's text may not match. Else as kept."""
        ids = tuple(token_ids) if token_ids else None
        known = self.source.find(prompt_id)
        if known is None or known.answer != answer:
            return Prompt(prompt_id, text, answer, ids)
        if (known.text, known.token_ids) == (text, ids):
            return known
        if columns is not None and _columns_digest(known) == columns:
            return Prompt(
                prompt_id,
                text,
                answer,
                ids,
                source=known.source,
                extra=known.extra,
                answer_value=known.answer_value,
                conversation=known.conversation,  # the row's own messages: a batch reward function's `prompts`
            )
        return Prompt(prompt_id, text, answer, ids, answer_value=known.answer_value)  # the answer matched: its value

    def load_state_dict(self, state: dict, groups_done: int) -> None:
        """Restore the prompt order; `groups_done` groups (trained on or buffered) count as started."""
        self.source.load_state_dict(state["source"])
        self.pending.extend(self._pending_prompt(*p) for p in state["pending_prompts"])
        self.started, self.given_back = groups_done, 0
