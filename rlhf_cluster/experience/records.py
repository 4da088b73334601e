"""Records that flow through the pipeline and their Arrow schema (the on-disk format too).

`Rollout` leaves generation; `ScoredSample` leaves scoring (reward, reference log-probs,
advantages) and is what the buffer stores and the learner consumes; `TrainBatch` is one learner
step's samples as padded tensors.

A response can span weight versions (a version loaded in flight while it was generated):
`policy_versions` lists `(first token index, version)` spans in order, and `policy_version` is
the oldest, the one the staleness bound is checked against.

A rollback (resume, or a lost learner rebuilt from a checkpoint) publishes version numbers again
with other weights. A sample scored before it, with weights newer than the checkpoint, is still
used (its rollout log-probs are its own, so importance correction holds), and
`rolled_back_steps` says how many optimizer steps of its weights the rollback abandoned: its
staleness counts the steps back to the weights both share and forward again
(`ScoredSample.staleness`).

A mixture-of-experts engine's routing (`routed_experts`, routing replay) travels with its sample:
from the rollout into the scored sample, its Arrow row (`routing_column`), the buffer's and the
scored log's files, and the `TrainBatch` (`routings`) whose rows the learner replays it on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import pyarrow as pa

from rlhf_cluster.experience.routing_column import (
    ROUTED_EXPERTS_TYPE,
    check_routed_experts,
    routing_from_row,
    routing_to_row,
)
from rlhf_cluster.models.routed_experts import RoutedExperts

# torch is imported by the functions that build tensors (TrainBatch): the scoring pool's reward
# workers use the records alone, and start ~2.5 CPU-s faster without it.
if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "abort"]

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("rollout_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("reward_components", pa.map_(pa.string(), pa.float32()), nullable=False),
        pa.field("ref_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("advantages", pa.list_(pa.float32()), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field(
            "policy_versions",
            pa.list_(
                pa.struct(
                    [pa.field("start", pa.int32(), nullable=False), pa.field("version", pa.int64(), nullable=False)]
                )
            ),
            nullable=False,
        ),
        pa.field("rolled_back_steps", pa.int32(), nullable=False),
        # Multi-turn: 1 on tokens the model sampled, 0 on tokens an environment or tool wrote
        # (no rollout log-prob; out of the loss, the advantages and the KL). Empty: all the model's.
        pa.field("loss_mask", pa.list_(pa.int8()), nullable=False),
        # Routing replay: the experts a mixture-of-experts engine routed the sequence's tokens to
        # (`routing_column`); null for a dense model, or an engine that returned none.
        pa.field("routed_experts", ROUTED_EXPERTS_TYPE, nullable=True),
        # A vision-language model's images of the sequence (prompt, then observations), encoded
        # (PNG, JPEG, ...), in the order of their placeholders; empty for text.
        pa.field("images", pa.list_(pa.binary()), nullable=False),
    ]
)

VersionSpans = list[tuple[int, int]]  # (index of the span's first response token, weight version)


def check_version_spans(sample_id: str, spans: VersionSpans, num_tokens: int, policy_version: int) -> None:
    """Spans start at token 0, start strictly later each time with a newer version, and the
    first one's version is `policy_version` (the oldest)."""
    problem = None
    if not spans or spans[0][0] != 0:
        problem = "must start at token 0"
    elif spans[0][1] != policy_version:
        problem = f"first version {spans[0][1]} differs from policy_version {policy_version}"
    elif any(b[0] <= a[0] or b[1] <= a[1] for a, b in zip(spans, spans[1:])):
        problem = "starts and versions must both increase"
    elif len(spans) > 1 and spans[-1][0] >= num_tokens:
        problem = f"a span starts at or after the last of {num_tokens} tokens"
    if problem:
        raise ValueError(f"sample {sample_id}: policy_versions {spans} {problem}")


def spans_version(spans: VersionSpans, token: int) -> int:
    """The weight version that sampled response token `token`."""
    return [v for start, v in spans if start <= token][-1]


@dataclass
class SampledResponse:
    """What the engine sampled for one response: its identity, tokens and per-token log-probs.

    The leading fields of both `Rollout` and `ScoredSample` (a scored sample keeps its rollout's).
    """

    sample_id: str
    prompt_id: str
    group_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    policy_version: int
    finish_reason: FinishReason


@dataclass
class Rollout(SampledResponse):
    """One response produced by a generation worker, with the engine's per-token log-probs."""

    response_text: str = ""
    worker: str = ""
    policy_versions: VersionSpans | None = None  # None: every token from `policy_version`
    loss_mask: list[int] | None = None  # multi-turn: 0 on tokens an environment wrote (None: all the model's)
    turn_rewards: list[float] | None = None  # multi-turn: the reward the environment gave each model turn
    turn_starts: list[int] | None = None  # multi-turn: where each model turn's tokens begin in the response
    # Why the sample failed before it could be scored (an agent that raised, hung or died), or "":
    # such a sample is not scored; it counts as a failed reward and is dropped like one.
    failure: str = ""
    # A turn of an agent episode trained per turn (`generation.agent.samples: turn`): the episode's
    # sample id, shared by its turns ("": the rollout is a whole episode or response).
    episode_id: str = ""
    # The experts a mixture-of-experts engine routed the sequence's tokens to (routing replay;
    # None: a dense model, or an engine that returned none).
    routed_experts: RoutedExperts | None = None
    # A vision-language model's images of the sequence, encoded, in placeholder order (prompt,
    # then observations): the learner, the reference and a judge see them as the engine did.
    images: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.turn_starts is not None and (
            len(self.turn_starts) != len(self.turn_rewards or [])
            or self.turn_starts != sorted(self.turn_starts)
            or any(not 0 <= t <= len(self.response_ids) for t in self.turn_starts)
        ):
            raise ValueError(
                f"rollout {self.sample_id}: turn starts {self.turn_starts} are not one ordered offset "
                f"into the {len(self.response_ids)} response tokens per turn reward"
            )
        if self.loss_mask is not None and len(self.loss_mask) != len(self.response_ids):
            raise ValueError(
                f"rollout {self.sample_id}: {len(self.loss_mask)} loss-mask values for {len(self.response_ids)} tokens"
            )
        if len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(
                f"rollout {self.sample_id}: {len(self.rollout_logprobs)} log-probs for {len(self.response_ids)} tokens"
            )
        if self.policy_versions is None:
            self.policy_versions = [(0, self.policy_version)]
        check_version_spans(self.sample_id, self.policy_versions, len(self.response_ids), self.policy_version)
        check_routed_experts(self.sample_id, self.routed_experts, len(self.prompt_ids) + len(self.response_ids))


@dataclass
class ScoredSample(SampledResponse):
    """A rollout with its reward, reference log-probs and per-token advantages: one buffer row."""

    reward: float
    reward_components: dict[str, float]
    # The reference's per-token log-probs; with `algorithm.distillation`, the teacher's (the
    # teacher pool's). The name is the on-disk schema's: old runs' logs and buffers still read.
    ref_logprobs: list[float]
    advantages: list[float]
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    policy_versions: VersionSpans | None = None  # None: every token from `policy_version`
    # Optimizer steps behind the newest weights that sampled this response which a later rollback
    # abandoned: the learner's history shares its weights only up to version `newest - rolled_back_steps`.
    rolled_back_steps: int = 0
    loss_mask: list[int] | None = None  # None: every response token was sampled by the model
    routed_experts: RoutedExperts | None = None  # the rollout's (mixture-of-experts engines; None: none)
    images: tuple[bytes, ...] = ()  # the rollout's (vision-language models; empty: text)

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if self.loss_mask is not None and (len(self.loss_mask) != n or any(x not in (0, 1) for x in self.loss_mask)):
            raise ValueError(f"sample {self.sample_id}: loss_mask must be {n} values of 0 or 1")
        for name in ("rollout_logprobs", "ref_logprobs", "advantages"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"sample {self.sample_id}: {name} has {len(getattr(self, name))} values for {n} tokens"
                )
        if self.policy_versions is None:
            self.policy_versions = [(0, self.policy_version)]
        self.policy_versions = [(start, version) for start, version in self.policy_versions]
        check_version_spans(self.sample_id, self.policy_versions, n, self.policy_version)
        check_routed_experts(self.sample_id, self.routed_experts, len(self.prompt_ids) + n)

    @property
    def version_spans(self) -> VersionSpans:
        """`policy_versions`, which `__post_init__` fills in where it was not given."""
        assert self.policy_versions is not None  # __post_init__ set it
        return self.policy_versions

    @property
    def model_tokens(self) -> list[int]:
        """1 where the model sampled the response token, 0 where an environment wrote it."""
        return [1] * len(self.response_ids) if self.loss_mask is None else list(self.loss_mask)

    @property
    def newest_version(self) -> int:
        """The newest weight version that sampled a token of the response."""
        return self.version_spans[-1][1]

    @property
    def effective_version(self) -> int:
        """The version a sample from the learner's own history would need to be as stale as this one.

        `policy_version` when nothing was rolled back. Otherwise the sample's weights and the
        learner's share history up to version `shared = newest_version - rolled_back_steps`, and
        the tokens of the newest version are `newest - shared` steps past it on the abandoned path
        plus the learner's steps past it: as stale as version `newest - 2 * rolled_back_steps`.
        Tokens of an older kept version count as that version.
        """
        return min(self.policy_version, self.newest_version - 2 * self.rolled_back_steps)

    def staleness(self, learner_version: int) -> int:
        """Optimizer steps between the weights that sampled this response and `learner_version`'s."""
        return learner_version - self.effective_version

    @property
    def spans_versions(self) -> bool:
        """Whether the response was sampled by more than one weight version."""
        return len(self.version_spans) > 1


def samples_to_table(samples: Iterable[ScoredSample]) -> pa.Table:
    """Samples as an Arrow table with exactly `SAMPLE_SCHEMA`."""
    rows = list(samples)
    columns = {f.name: [getattr(s, f.name) for s in rows] for f in SAMPLE_SCHEMA}
    columns["reward_components"] = [list(s.reward_components.items()) for s in rows]
    columns["policy_versions"] = [[{"start": a, "version": v} for a, v in s.version_spans] for s in rows]
    columns["loss_mask"] = [s.loss_mask or [] for s in rows]
    columns["routed_experts"] = [routing_to_row(s.routed_experts) for s in rows]
    columns["images"] = [list(s.images) for s in rows]
    return pa.Table.from_pydict(columns, schema=SAMPLE_SCHEMA)


def table_to_samples(table: pa.Table) -> list[ScoredSample]:
    """Inverse of `samples_to_table`; refuses a table whose schema differs."""
    if "rolled_back_steps" not in table.schema.names:  # written before the field existed: nothing rolled back
        table = table.append_column(
            SAMPLE_SCHEMA.field("rolled_back_steps"), pa.array([0] * table.num_rows, pa.int32())
        )
    if "loss_mask" not in table.schema.names:  # written before multi-turn: every token the model's
        table = table.append_column(
            SAMPLE_SCHEMA.field("loss_mask"), pa.array([[]] * table.num_rows, pa.list_(pa.int8()))
        )
    if "routed_experts" not in table.schema.names:  # written before routing replay: no routing
        table = table.append_column(
            SAMPLE_SCHEMA.field("routed_experts"), pa.nulls(table.num_rows, ROUTED_EXPERTS_TYPE)
        )
    if "images" not in table.schema.names:  # written before vision-language models: no images
        table = table.append_column(
            SAMPLE_SCHEMA.field("images"), pa.array([[]] * table.num_rows, pa.list_(pa.binary()))
        )
    if set(table.schema.names) == set(SAMPLE_SCHEMA.names):
        table = table.select(SAMPLE_SCHEMA.names)
    if not table.schema.equals(SAMPLE_SCHEMA):
        raise ValueError(f"sample table schema differs from SAMPLE_SCHEMA:\n{table.schema}")
    out = []
    for row in table.to_pylist():
        row["reward_components"] = dict(row["reward_components"])
        row["policy_versions"] = [(span["start"], span["version"]) for span in row["policy_versions"]]
        row["loss_mask"] = row["loss_mask"] or None
        row["routed_experts"] = routing_from_row(row["routed_experts"])
        row["images"] = tuple(row["images"])
        out.append(ScoredSample(**row))
    return out


def token_budget_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive index batches whose padded size (rows x longest) stays within `max_tokens`
    (a single longer item still gets a batch of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, length in enumerate(lengths):
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def pad_sequences(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Right-padded prompt+response ids: (input_ids, attention_mask, prompt_lengths, T), where T
    is the longest response (at least 1). The mask comes from lengths, never from token ids."""
    import torch

    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max(max(len(r) for r in responses), 1)
    input_ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, : len(p) + len(r)] = 1
    return input_ids, attention_mask, torch.tensor([len(p) for p in prompts], dtype=torch.long), T


@dataclass
class TrainBatch:
    """One learner step's samples, right-padded to tensors.

    `input_ids` is prompt+response; `response_mask` marks response tokens in the *response*
    frame [B, T_resp]; the learner slices its log-probs to that frame.
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    prompt_lengths: torch.Tensor  # [B] long
    response_mask: torch.Tensor  # [B, T] float
    rollout_logprobs: torch.Tensor  # [B, T]
    ref_logprobs: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T]
    policy_versions: torch.Tensor  # [B] long
    sample_ids: list[str]
    # The critic's regression targets and the values the advantages were computed with (PPO with a
    # critic only; None otherwise).
    returns: torch.Tensor | None = None  # [B, T]
    old_values: torch.Tensor | None = None  # [B, T]
    # Routing replay: each row's routed experts (host-side, as the samples carry them; None per
    # row without one), or None when no sample of the batch has one.
    routings: list[RoutedExperts | None] | None = None
    # A vision-language model's images, per row (encoded, in placeholder order; the learner runs
    # its image processor on them), or None when no sample of the batch has one.
    images: list[tuple[bytes, ...]] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    @classmethod
    def from_samples(
        cls,
        samples: list[ScoredSample],
        pad_id: int = 0,
        in_loss: list[bool] | None = None,
        returns: list[list[float]] | None = None,
        old_values: list[list[float]] | None = None,
    ) -> TrainBatch:
        """Pad samples into tensors; `in_loss[i] = False` removes sample i from the loss entirely.
        `returns` and `old_values` (per sample, one per response token) are the critic's inputs."""
        import torch

        if not samples:
            raise ValueError("cannot build a TrainBatch from no samples")
        B = len(samples)
        input_ids, attention_mask, prompt_lengths, T = pad_sequences(
            [s.prompt_ids for s in samples], [s.response_ids for s in samples], pad_id
        )
        response_mask = torch.zeros((B, T))
        rollout, ref, adv = torch.zeros((B, T)), torch.zeros((B, T)), torch.zeros((B, T))
        for i, s in enumerate(samples):
            n = len(s.response_ids)
            if in_loss is None or in_loss[i]:
                response_mask[i, :n] = torch.tensor(s.model_tokens, dtype=response_mask.dtype)
            rollout[i, :n] = torch.tensor(s.rollout_logprobs)
            ref[i, :n] = torch.tensor(s.ref_logprobs)
            adv[i, :n] = torch.tensor(s.advantages)
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            prompt_lengths=prompt_lengths,
            response_mask=response_mask,
            rollout_logprobs=rollout,
            ref_logprobs=ref,
            advantages=adv,
            policy_versions=torch.tensor([s.policy_version for s in samples], dtype=torch.long),
            sample_ids=[s.sample_id for s in samples],
            returns=None if returns is None else _pad_rows(returns, samples, T, "returns"),
            old_values=None if old_values is None else _pad_rows(old_values, samples, T, "old_values"),
            routings=[s.routed_experts for s in samples]
            if any(s.routed_experts is not None for s in samples)
            else None,
            images=[s.images for s in samples] if any(s.images for s in samples) else None,
        )


def _pad_rows(rows: list[list[float]], samples: list[ScoredSample], T: int, name: str) -> torch.Tensor:
    """Per-token rows into a zero-padded [B, T] tensor, each row checked against its sample's length."""
    import torch

    if len(rows) != len(samples):
        raise ValueError(f"{name}: {len(rows)} rows for {len(samples)} samples")
    out = torch.zeros((len(samples), T))
    for i, (row, s) in enumerate(zip(rows, samples)):
        if len(row) != len(s.response_ids):
            raise ValueError(f"sample {s.sample_id}: {name} has {len(row)} values for {len(s.response_ids)} tokens")
        out[i, : len(row)] = torch.tensor(row)
    return out
