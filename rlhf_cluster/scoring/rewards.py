"""Rule-based rewards: a task's verifier, or a user's function, applied to responses.

A custom reward (a `function` source in `scoring.rewards`) is called once per response as
`function(response_text, answer)` (the answer a string, "" without an answer column), with, by
keyword, whichever of these its signature names (a `**kwargs` parameter gets them all):

- `prompt`: the prompt text as the policy saw it (the chat template's rendering when
  `data.chat_template` is on; list the raw column in `data.columns.extra` for the question alone);
- `source`: the row's `data.columns.source` value (None without that column);
- `extra`: a dict of the row's `data.columns.extra` columns, as pyarrow reads them (a JSON object
  is a dict, a list a list; {} without any);
- `prompt_id`: the prompt's id.

e.g. `def score(response, answer, *, source, extra): ...`. The signature is checked when the
function is loaded: a parameter without a default that is none of these is refused, naming it.
The function returns either

- a number: that is the reward; or
- a `dict[str, float]` of components: the reward is `components["reward"]` when the dict has a
  `"reward"` key (the other entries are only recorded), otherwise the sum of all components.

Held-out accuracy (and pass@k, and guardrails on them) counts an answer right by its `correct`
component (the verifier's name), else verl's `acc`, at least 1: a function returning a number (or
a dict without either) says no answer right, and its evaluation reports the held-out reward alone
(`answer_correct`).

A function written for verl (it names `solution_str` and `ground_truth`) is called as verl calls
its `compute_score`, by keyword (`verl_rewards.py`). With `batch: true` the function is instead
called once per scoring call, over lists (TRL's
`reward_func(prompts, completions, completion_ids, **columns)`, verl's BatchRewardManager; see
rlhf_cluster/scoring/batch_rewards.py): each item of the list it returns is read as above, and
`None`, a wrong length, a raise or a timeout fails its sample or every sample of the call, judged
per sample below. An `async def` function's coroutine runs to its end on an event loop of its
call's thread. Each call runs on its own daemon thread and is abandoned after `timeout_s` (a Python
thread cannot be killed: a call that never returns keeps its thread, but never stalls the
worker); a worker runs up to `concurrency` per-sample calls at once (a slow verifier: a sandbox, a remote
API), its results in the responses' order. A call that raises, returns NaN/inf, an empty dict or
anything that is not a number or a dict of numbers, or runs past its timeout, has failed; the
source's `on_error` decides:

- `fail`: `RewardFunctionError` at once, naming the function, the prompt id and the cause;
- `drop`: the sample gets reward 0.0 and `reward_components["reward_failed"] = 1.0`; the driver
  drops that sample (counted; never trained on) and its group keeps the rest when enough remain
  for the advantage estimator (`job_state.min_group_size`), else drops the group whole.
  `RuleReward.failed` counts it.

Scored samples of a custom function carry `reward_failed = 0.0`, so the mean of that component
over a batch is its failure rate. Even with `drop`, two bounds raise `RewardFunctionError` naming
the function, the failure rate and the last cause: its first `BROKEN_AFTER` calls all failing (a
broken function, not a bad response), and more than `max_failure_fraction` failures among the last
`failure_window` samples this worker scored (a function that fails often enough that dropping
its samples would bias or starve training; a warning is logged at half that rate).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from rlhf_cluster.data.tasks import combine_reward
from rlhf_cluster.data.verifiers import build_verifier
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.scoring.batch_rewards import BatchCallFailed, batch_keywords, batch_outcomes
from rlhf_cluster.scoring.reward_calls import awaited, call_with_timeout, reward_of
from rlhf_cluster.scoring.verl_rewards import verl_arguments, verl_batch_style, verl_keywords, verl_style, verl_value
from rlhf_cluster.user_code import FailureRate, import_spec

if TYPE_CHECKING:
    from rlhf_cluster.data.prompts import Prompt

FAILED = "reward_failed"
BROKEN_AFTER = 32  # first samples all failing: the function itself is broken
log = logging.getLogger(__name__)
RewardFn = Callable[..., "float | dict[str, float]"]  # (response, answer, **context) -> reward
CONTEXT: tuple[str, ...] = ("prompt", "source", "extra", "prompt_id")  # what a reward function may take by keyword


@dataclass(frozen=True)
class RewardContext:
    """What the reward worker knows of one prompt: its reference answer, and what a custom reward
    function may ask for besides (see the module docstring)."""

    answer: str
    prompt: str = ""
    source: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    answer_value: Any = None  # the answer column's own value where it is no string (`Prompt.answer_value`)
    # The prompt's chat messages as its data.columns.messages column gives them (`Prompt.conversation`);
    # None: a plain prompt. A batch function's `prompts` are then these (TRL's conversational form).
    messages: tuple[dict, ...] | None = None


def reward_contexts(prompts: Iterable[Prompt], conversational: bool = False) -> dict[str, RewardContext]:
    """Each prompt's `RewardContext`, by prompt id: what scoring its responses is sent.
    `conversational`: the job's prompts come from a messages column (`data.columns.messages`), so
    every context holds messages, a prompt that lost its own (a checkpoint's pending prompt whose
    row changed since) its text as one user turn: a batch function gets one form for the whole job."""
    return {
        p.prompt_id: RewardContext(p.answer, p.text, p.source, p.extra, p.answer_value, _messages(p, conversational))
        for p in prompts
    }


def _messages(prompt: Prompt, conversational: bool) -> tuple[dict, ...] | None:
    if prompt.conversation is not None or not conversational:
        return prompt.conversation
    return ({"role": "user", "content": prompt.text},)


class RewardFunctionError(RuntimeError):
    """The custom reward function failed (`on_error: fail`), failed `BROKEN_AFTER` times in a row,
    or failed on more than `max_failure_fraction` of its recent samples."""


def load_reward_fn(
    spec: str, field: str = "scoring.rewards[].function", *, batch: bool = False, columns: Sequence[str] | None = None
) -> RewardFn:
    """Import `module:function` (the attribute may be dotted, e.g. `module:Class.method`) and
    check its signature (`context_keywords`; with `batch`, `batch_keywords` over the extra
    `columns`, None: not known).

    Errors are ValueErrors that name the config field, the spec and what went wrong.
    """
    where = f"{field}={spec!r}"
    fn = import_spec(spec, field)
    attr = spec.strip().partition(":")[2]
    if not callable(fn):
        raise ValueError(f"{where}: {attr!r} is a {type(fn).__name__}, not a function")
    if batch:
        batch_keywords(fn, where, columns)
    elif verl_style(fn):  # a verl compute_score is called by keyword, as verl calls it
        verl_keywords(fn, where)
    else:
        context_keywords(fn, where)
    return fn


def context_keywords(fn: Callable, where: str) -> tuple[str, ...]:
    """The `CONTEXT` names `fn` takes by keyword after (response, answer): those its signature
    names, or all with `**kwargs`. A ValueError naming `where` when it cannot take
    (response, answer) positionally, or requires a parameter that is none of them."""
    try:
        signature = inspect.signature(fn)
    except ValueError:
        return ()  # no introspectable signature (some builtins): let the call decide
    params = signature.parameters
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        wanted = CONTEXT
    else:
        wanted = tuple(n for n in CONTEXT if n in params and params[n].kind in by_keyword)
    try:
        signature.bind("response", "answer", **dict.fromkeys(wanted))
    except TypeError as exc:
        unknown = [
            p.name
            for p in list(params.values())[2:]
            if p.kind in by_keyword and p.default is p.empty and p.name not in CONTEXT
        ]
        if unknown:
            raise ValueError(
                f"{where}: the function requires parameter(s) {unknown}, which a reward function is not given: "
                f"it gets (response, answer) positionally, then any of {list(CONTEXT)} by keyword (**kwargs: all)"
            ) from exc
        raise ValueError(f"{where}: the function must accept (response: str, answer: str): {exc}") from exc
    return wanted


class RuleReward:
    """Scores responses with a built-in verifier (`data.verifier`), or with a custom `module:function`.

    `scored` counts every sample passed to `score`; `failed` the ones whose custom reward failed
    (always 0 for a built-in verifier, whose errors propagate: they are bugs, not bad samples).
    """

    def __init__(
        self,
        verifier: str | None = None,
        *,
        pattern: str | None = None,
        reward_fn: str | RewardFn | None = None,
        on_error: Literal["fail", "drop"] = "drop",
        timeout_s: float | None = None,
        max_failure_fraction: float = 0.5,
        failure_window: int = 200,
        concurrency: int = 1,
        batch: bool = False,
        columns: Sequence[str] | None = None,
    ):
        """`batch`: one call over lists per `score` (batch_rewards.py), its signature checked against
        the extra `columns` when given (`data.columns.extra`; None: not known, any name may be one)."""
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency}: expected at least 1 call at a time")
        if batch and concurrency > 1:
            raise ValueError(f"concurrency={concurrency} with batch: a batch function is called once per batch")
        self.batch = batch
        self.concurrency = concurrency
        self.scored = 0
        self.failed = 0
        self.timed_out = 0
        self.fn: RewardFn | None = None
        self.on_error, self.timeout_s = on_error, timeout_s
        self.fn_name = reward_fn if isinstance(reward_fn, str) else getattr(reward_fn, "__qualname__", repr(reward_fn))
        self.failures = FailureRate(
            f"reward function {self.fn_name} (scoring.rewards)", max_failure_fraction, failure_window, BROKEN_AFTER
        )
        self.keywords: tuple[str, ...] = ()  # the `CONTEXT` the custom function takes
        self.batch_names: tuple[str, ...] | None = None  # a batch function's keywords (None: all)
        self.verl = False  # a function written for verl (`verl_rewards`)
        self.verl_names: tuple[str, ...] | None = None  # what a verl-style per-sample function takes (None: all)
        if reward_fn is not None:
            self.fn = load_reward_fn(reward_fn, batch=batch) if isinstance(reward_fn, str) else reward_fn
            where = f"reward function {self.fn_name}"
            self.verl = verl_batch_style(self.fn) if batch else verl_style(self.fn)
            if batch:
                self.batch_names = batch_keywords(self.fn, where, columns)
            elif self.verl:
                self.verl_names = verl_keywords(self.fn, where)
            else:
                self.keywords = context_keywords(self.fn, where)
            return
        if verifier is None:
            raise ValueError(
                "no reward: set data.verifier (or data.task, whose verifier is used) or add a "
                "`function` source ('module:function') to scoring.rewards"
            )
        self.verify, self.weights = build_verifier(verifier, pattern)

    def score(
        self, rollouts: list[Rollout], contexts: Mapping[str, RewardContext | str]
    ) -> list[tuple[float, dict[str, float]]]:
        """(reward, components) per rollout; `contexts`: each prompt's `RewardContext` by prompt id
        (`reward_contexts`), or its answer alone."""
        missing = [r.prompt_id for r in rollouts if r.prompt_id not in contexts]
        if missing:
            raise KeyError(f"no reference answer for prompt {missing[0]!r}")
        known = {k: RewardContext(v) if isinstance(v, str) else v for k, v in contexts.items()}
        if self.fn is None:
            out = []
            for r in rollouts:
                components = self.verify(r.response_text, known[r.prompt_id].answer)
                out.append((combine_reward(components, self.weights), components))
            self.scored += len(out)
            return out
        return self._score_custom(rollouts, known)

    def _call(self, rollout: Rollout, context: RewardContext) -> object:
        """The custom function's value for `rollout`: (response, answer) and the context it takes."""
        assert self.fn is not None  # score() comes here only for a custom function
        if self.verl:  # its value is read as verl reads it (`_score_custom`)
            truth = context.answer if context.answer_value is None else context.answer_value  # verl's raw ground truth
            kwargs = verl_arguments(
                self.verl_names, rollout.response_text, truth, context.source, context.extra,
                prompt=context.prompt, prompt_id=rollout.prompt_id,
            )  # fmt: skip
            return call_with_timeout(partial(awaited, partial(self.fn, **kwargs)), (), self.timeout_s)
        given = {
            "prompt": context.prompt,
            "source": context.source,
            "extra": copy.deepcopy(dict(context.extra)),  # its own copy, nested lists too: edits stay in the call
            "prompt_id": rollout.prompt_id,
        }
        fn = partial(self.fn, **{k: given[k] for k in self.keywords}) if self.keywords else self.fn
        return call_with_timeout(partial(awaited, fn), (rollout.response_text, context.answer), self.timeout_s)

    def _call_batch(self, arguments: dict[str, list]) -> object:
        """The batch function's value for one batch (`batch_outcomes`), awaited, within the timeout."""
        assert self.fn is not None  # score() comes here only for a custom function
        return call_with_timeout(partial(awaited, partial(self.fn, **arguments)), (), self.timeout_s)

    def _outcomes(
        self, rollouts: list[Rollout], contexts: dict[str, RewardContext]
    ) -> Iterable[tuple[object, Exception | None]]:
        """Each rollout's call: its value, or what it raised. One call at a time, lazily (`on_error:
        fail` stops calling at the first failure), up to `concurrency` at once, in order, or one
        batch call for them all (`batch`)."""

        def outcome(rollout: Rollout) -> tuple[object, Exception | None]:
            try:
                return self._call(rollout, contexts[rollout.prompt_id]), None
            except Exception as exc:  # judged in order by `_score_custom`
                return None, exc

        if self.batch:
            return batch_outcomes(self._call_batch, rollouts, contexts, self.batch_names)
        if self.concurrency == 1 or len(rollouts) < 2:
            return map(outcome, rollouts)
        # Each call's own thread is abandoned at its timeout, so the pool's threads end within it.
        with ThreadPoolExecutor(min(self.concurrency, len(rollouts)), thread_name_prefix="reward-call") as pool:
            return list(pool.map(outcome, rollouts))

    def _score_custom(
        self, rollouts: list[Rollout], contexts: dict[str, RewardContext]
    ) -> list[tuple[float, dict[str, float]]]:
        out: list[tuple[float, dict[str, float]]] = []
        failed = 0
        calls: list[BatchCallFailed] = []  # failed batch calls: every sample of one fails, the bounds count it once
        for r, (value, error) in zip(rollouts, self._outcomes(rollouts, contexts)):
            try:
                if error is not None:
                    raise error
                reward, components = reward_of(verl_value(value) if self.verl else value)
            except Exception as exc:  # a bad sample must not end the job unless on_error says so
                failed += 1
                if not any(exc is call for call in calls):
                    if isinstance(exc, BatchCallFailed):
                        calls.append(exc)
                    self._judge_failure(r, exc, len(out), failed, len(rollouts))
                out.append((0.0, {FAILED: 1.0}))
                continue
            self.failures.ok()
            out.append((reward, {**components, FAILED: 0.0}))
        self.scored += len(rollouts)
        self.failed += failed
        return out

    def _judge_failure(self, r: Rollout, exc: Exception, done: int, failed: int, samples: int) -> None:
        """A failed sample, or batch call of `samples` samples, as `on_error` and the failure bounds
        judge it (a call counts once in a row, each of its samples in the window): a
        `RewardFunctionError` ends the job, naming it; `done` samples scored before it in the call."""
        whole = isinstance(exc, BatchCallFailed)
        n = samples if whole else 1
        self.timed_out += isinstance(exc.__cause__ if whole else exc, TimeoutError)
        cause = f"{exc}" if whole else f"prompt {r.prompt_id!r} (sample {r.sample_id}): {type(exc).__name__}: {exc}"
        if self.on_error == "fail":
            self.scored, self.failed = self.scored + done + n, self.failed + n
            raise RewardFunctionError(
                f"reward function {self.fn_name} failed on {cause} "
                "(scoring.rewards on_error: fail; `drop` drops such groups instead)"
            ) from exc
        broken = self.failures.failed(cause, n)
        if broken is not None:
            self.scored, self.failed = self.scored + done + n, self.failed + failed - 1 + n
            raise RewardFunctionError(broken) from exc


def weighted_rule(rule: list[tuple[float, dict[str, float]]], weight: float) -> list[tuple[float, dict[str, float]]]:
    """The rule reward alone at its source's weight (with reward models `combine_rewards` weighs
    it); the unweighted value is kept as the `rule` component. Weight 1: unchanged."""
    if weight == 1.0:
        return rule
    return [(weight * reward, {**components, "rule": reward}) for reward, components in rule]


def combine_rewards(
    rule: list[tuple[float, dict[str, float]]],
    model_scores: dict[str, list[float]],
    *,
    rule_weight: float = 1.0,
    model_weight: float = 1.0,
    combine: str = "mean",
) -> list[tuple[float, dict[str, float]]]:
    """One reward per sample from the rule reward (verifier or custom function) and reward models.

    ``reward = rule_weight * rule + model_weight * ensemble``, where the ensemble is the mean or
    min of the models' scores. Every part is recorded in the components: the rule's own
    components, ``rule``, ``rm/<name>`` per model and ``rm`` for the ensemble.
    """
    # torch only here: a reward worker without reward models never imports it (~2.5 CPU-s per start).
    import torch

    from rlhf_cluster.rewards import ensemble

    if combine not in ("mean", "min"):
        raise ValueError(f"combine must be 'mean' or 'min', got {combine!r}")
    combined = (
        ensemble(torch.tensor(list(model_scores.values()), dtype=torch.float64), combine).tolist()
        if model_scores
        else None
    )
    out = []
    for i, (rule_reward, components) in enumerate(rule):
        components = {**components, "rule": rule_reward}
        reward = rule_weight * rule_reward
        if combined is not None:
            components.update({f"rm/{name}": values[i] for name, values in model_scores.items()}, rm=combined[i])
            reward += model_weight * combined[i]
        out.append((reward, components))
    return out
