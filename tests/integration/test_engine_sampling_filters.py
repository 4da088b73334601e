"""`generation.sampling.top_k`, `min_p` and `repetition_penalty` on a real vLLM engine (CPU, tiny
model): they reach vLLM for a group's responses (`sampling=`, the path held-out evaluation's
`data.eval_sampling` takes) and for an episode's turns, and the log-probs the engine returns are
those of the distribution after them (vLLM's `processed_logprobs`), checked against a Hugging Face
forward with the same filters applied by hand. Settings and bounds alone: tests/unit/test_sampling_filters.py.

The engine runs in one child process for the whole module (vLLM sets up a torch.distributed group
and process-wide settings in its process). No Ray."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

PROMPT = list(range(3, 43))  # 40 distinct tokens: a repetition penalty moves much of the next token's mass
TOKENS = 6
TOLERANCE = 5e-4  # vLLM CPU against HF (1e-4 in the engine tests), a penalty of 8 scaling some logits' error
_engine = None  # the child's engine


# ---- in the child process -----------------------------------------------------------------------
def _start(model_path: str) -> None:
    global _engine
    from rlhf_cluster.config import GenerationConfig, SamplingConfig
    from rlhf_cluster.generation.engine import VLLMEngine

    sampling = SamplingConfig(n=4, max_new_tokens=TOKENS, ignore_eos=True)
    _engine = VLLMEngine(model_path, GenerationConfig(max_num_seqs=16, sampling=sampling))


def _group(settings: dict, greedy: bool = False) -> list[tuple[list[int], list[float]]]:
    """A group's (response ids, log-probs) sampled with `settings` over the engine's sampling."""
    from rlhf_cluster.data.prompts import Prompt

    assert _engine is not None
    sampling = _engine.cfg.sampling.model_copy(update=settings)
    prompt = Prompt("p", "", "", token_ids=tuple(PROMPT))
    rollouts = _engine.submit_group(prompt, greedy=greedy, sampling=sampling).result(timeout=120)
    return [(r.response_ids, r.rollout_logprobs) for r in rollouts]


def _turns(settings: dict, count: int, greedy: bool = False) -> list[tuple[list[int], list[float]]]:
    """`count` episode turns continuing PROMPT, the engine's `generation.sampling` being `settings` over its own."""
    assert _engine is not None
    own = _engine.cfg
    _engine.cfg = own.model_copy(update={"sampling": own.sampling.model_copy(update=settings)})
    try:
        futures = [_engine.submit_turn(PROMPT, TOKENS, [], greedy) for _ in range(count)]
        return [(t.token_ids, t.logprobs) for t in (f.result(timeout=120) for f in futures)]
    finally:
        _engine.cfg = own


def _stop() -> None:
    assert _engine is not None
    _engine.close()


# ---- the parent ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tiny_model_path):
    """Run a function in the engine's process."""
    pool = ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=_start, initargs=(tiny_model_path,)
    )
    try:

        def call(fn, *args):
            return pool.submit(fn, *args).result(timeout=300)

        yield call
        call(_stop)
    finally:
        pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from rlhf_cluster.models.modeling import load_causal_lm

    return load_causal_lm(tiny_model_path).eval()


def _reference(model, response: list[int], temperature=1.0, top_k=0, penalty=1.0) -> list[float]:
    """log p(response[i] | PROMPT + response[:i]) after vLLM's steps by hand: the repetition penalty
    on every token seen so far (prompt and response), temperature, top-k, renormalised."""
    ids = PROMPT + response
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    out = []
    for i, token in enumerate(response):
        row = logits[len(PROMPT) - 1 + i].clone()
        seen = torch.tensor(sorted(set(ids[: len(PROMPT) + i])))
        row[seen] = torch.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
        row = row / temperature
        if top_k > 0:
            row[row < row.topk(top_k).values[-1]] = -torch.inf
        out.append(float(row.log_softmax(-1)[token]))
    return out


def _gap(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want) == TOKENS
    return max(abs(a - b) for a, b in zip(got, want))


def test_top_k_1_and_min_p_1_sample_the_greedy_answer_with_log_prob_0(run):
    """top_k 1 keeps the likeliest token alone, and so does min_p 1 (none other is as likely): every
    sample of a group (held-out evaluation's path) and every turn of an episode is the greedy answer,
    drawn with probability 1 (the engine's log-probs are those after the filter)."""
    ((greedy, _),) = run(_group, {}, True)
    sampled = run(_group, {})  # the control: unfiltered, a random model's samples differ
    assert len({tuple(ids) for ids, _ in sampled}) > 1
    for settings in ({"top_k": 1}, {"min_p": 1.0}):
        group = run(_group, settings)
        assert [ids for ids, _ in group] == [greedy] * 4, settings
        assert all(lp == pytest.approx([0.0] * TOKENS, abs=1e-6) for _, lp in group), settings
    ((greedy_turn, _),) = run(_turns, {}, 1, True)
    turns = run(_turns, {"top_k": 1}, 3)
    assert greedy_turn == greedy and [ids for ids, _ in turns] == [greedy] * 3
    assert all(lp == pytest.approx([0.0] * TOKENS, abs=1e-6) for _, lp in turns)
    assert len({tuple(ids) for ids, _ in run(_turns, {}, 3)}) > 1  # the turns' control


def test_log_probs_are_after_the_repetition_penalty_and_top_k(run, model):
    """The engine's log-probs of its sampled tokens are the model's after the penalty (and top-k),
    not the model's own: what importance correction compares with the learner's."""
    plain = run(_group, {"temperature": 0.8})
    for ids, lps in plain:  # the control: no filter, the model's own at temperature 0.8
        assert _gap(lps, _reference(model, ids, temperature=0.8)) < TOLERANCE
    for settings in ({"temperature": 0.8, "repetition_penalty": 8.0}, {"repetition_penalty": 8.0, "top_k": 5}):
        args = {"temperature": settings.get("temperature", 1.0), "top_k": settings.get("top_k", 0)}
        for ids, lps in run(_group, settings):
            assert _gap(lps, _reference(model, ids, penalty=8.0, **args)) < TOLERANCE, settings
            assert _gap(lps, _reference(model, ids, **args)) > 10 * TOLERANCE, settings
    # Greedy keeps the penalty (it changes the argmax): no token of the prompt or the answer recurs.
    ((greedy, lps),) = run(_group, {"repetition_penalty": 8.0}, True)
    assert _gap(lps, _reference(model, greedy, penalty=8.0)) < TOLERANCE
    assert not set(greedy) & set(PROMPT) and len(set(greedy)) == TOKENS
