"""Sequence packing (rlhf_cluster/models/packing.py): packed rows give the padded rows' log-probs and
gradients, a learner step packed equals one padded, and micro-batches keep to a token budget."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from rlhf_cluster.config import JobConfig
from rlhf_cluster.experience.records import TrainBatch, pad_sequences
from rlhf_cluster.learner.fsdp2 import FSDP2Learner
from rlhf_cluster.learner.spec import LearnerSpec
from rlhf_cluster.models.modeling import attention_of, load_causal_lm, response_logprobs
from rlhf_cluster.models.packing import balanced_parts, balanced_shares, pack_rows, token_budget_micro_batches
from tests.batches import ragged_batch


def _rows(vocab: int, seed: int = 0):
    """Right-padded rows of unequal prompt and response lengths (9, 3, 9, 11, 4 and 7 tokens), and
    the response mask."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(n)] for n in (4, 2, 6, 3, 2, 5)]
    responses = [[rng.randrange(1, vocab) for _ in range(n)] for n in (5, 1, 3, 8, 2, 2)]
    input_ids, attention_mask, prompt_lengths, T = pad_sequences(prompts, responses)
    mask = torch.zeros(len(responses), T)
    for i, r in enumerate(responses):
        mask[i, : len(r)] = 1
    return input_ids, attention_mask, prompt_lengths, T, mask


@pytest.mark.parametrize("attention", ["flash_attention_2", "sdpa"])
def test_packed_rows_hold_only_real_tokens_and_score_inside_their_own_sequence(attention):
    input_ids, attention_mask, prompt_lengths, T, mask = _rows(50)
    packing = pack_rows(input_ids, attention_mask, prompt_lengths, T, attention)
    packed = packing.input_ids(input_ids)
    lengths = attention_mask.sum(1).tolist()
    R, C = packed.shape
    if attention == "sdpa":  # rows no wider than the longest sequence, fewer than the padded rows
        assert C == max(lengths) and R < len(lengths)
    else:  # every sequence in one row, nothing else
        assert (R, C) == (1, sum(lengths))
    assert int((packing.sequence_ids >= 0).sum()) == sum(lengths)  # each real token once, no padding else
    for i, length in enumerate(lengths):
        slots = (packing.sequence_ids.reshape(-1) == i).nonzero().squeeze(1)
        assert slots.tolist() == list(range(int(slots[0]), int(slots[0]) + length))  # contiguous
        assert int(slots[0]) // C == int(slots[-1]) // C  # within one row
        assert packed.reshape(-1)[slots].tolist() == input_ids[i, :length].tolist()
        assert packing.position_ids.reshape(-1)[slots].tolist() == list(range(length))
        assert ((packing.positions[i] >= slots[0]) & (packing.positions[i] <= slots[-1] - 1)).all()
        n = int(mask[i].sum())  # the real response tokens: each predicted by the token before it
        start = int(prompt_lengths[i])
        assert packing.targets(packed)[i, :n].tolist() == input_ids[i, start: start + n].tolist()


def test_only_the_response_tokens_that_exist_are_scored(tiny_model, monkeypatch):
    """The output layer runs at the responses' real tokens only, not at [B, T] padded to the longest
    response (at the GPU benchmark's batch 6,239 of 11,700 positions); the rest read 0."""
    import rlhf_cluster.models.chunked_logprobs as chunked

    input_ids, attention_mask, prompt_lengths, T, mask = _rows(tiny_model.config.vocab_size)
    packing = pack_rows(input_ids, attention_mask, prompt_lengths, T, attention_of(tiny_model)[0])
    assert packing.scored.tolist() == mask.reshape(-1).nonzero().squeeze(1).tolist()
    rows: list[int] = []
    real = chunked.token_logprobs
    monkeypatch.setattr(chunked, "token_logprobs", lambda hidden, *a, **k: rows.append(len(hidden)) or real(hidden, *a, **k))
    with torch.no_grad():
        logp, entropy = response_logprobs(tiny_model, input_ids, attention_mask, prompt_lengths, T, 1.0, True)
        padded, _ = response_logprobs(tiny_model, input_ids, attention_mask, prompt_lengths, T, packed=False)
    assert rows == [int(mask.sum()), mask.numel()]  # packed: the real ones; padded (no plan): all of [B, T]
    assert torch.equal(logp * (1 - mask), torch.zeros_like(logp)) and torch.equal(entropy * (1 - mask), torch.zeros_like(logp))
    assert torch.allclose(logp * mask, padded * mask, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rlhf_cluster.config import TinyModelConfig
    from rlhf_cluster.models.tiny_model import ensure_tiny_model

    return load_causal_lm(ensure_tiny_model(TinyModelConfig(), str(tmp_path_factory.mktemp("models"))))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_log_probs_and_gradients_equal_the_padded_ones(tiny_model, attention):
    """Several sequences share a packed row (SDPA's and eager attention's rows are as wide as the
    longest sequence): the same values and gradients as right-padded rows."""
    padded_model, packed_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    for model in (padded_model, packed_model):
        model.config._attn_implementation = attention
    input_ids, attention_mask, prompt_lengths, T, mask = _rows(tiny_model.config.vocab_size)
    a, a_ent = response_logprobs(padded_model, input_ids, attention_mask, prompt_lengths, T, 0.9, True, packed=False)
    b, b_ent = response_logprobs(packed_model, input_ids, attention_mask, prompt_lengths, T, 0.9, True)
    assert torch.allclose(a * mask, b * mask, atol=1e-5) and torch.allclose(a_ent * mask, b_ent * mask, atol=1e-5)
    ((a * mask).sum() + (a_ent * mask).sum()).backward()
    ((b * mask).sum() + (b_ent * mask).sum()).backward()
    for (name, p), q in zip(padded_model.named_parameters(), packed_model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_a_sequence_attends_only_to_itself_when_packed(tiny_model):
    """Changing one sequence's tokens moves no other's log-probs (a causal mask across the
    sequences sharing a row would)."""
    input_ids, attention_mask, prompt_lengths, T, mask = _rows(tiny_model.config.vocab_size)
    packing = pack_rows(input_ids, attention_mask, prompt_lengths, T, attention_of(tiny_model)[0])
    # Sequences 4 (4 tokens) and 5 (7 tokens) share a row: change the one placed first in it.
    shared_row = packing.sequence_ids[(packing.sequence_ids == 5).any(1)].reshape(-1).tolist()
    assert {4, 5} <= set(shared_row) <= {-1, 4, 5}
    first = shared_row[0]
    with torch.no_grad():
        before, _ = response_logprobs(tiny_model, input_ids, attention_mask, prompt_lengths, T)
        changed = input_ids.clone()
        changed[first, :2] = (changed[first, :2] + 7) % tiny_model.config.vocab_size
        after, _ = response_logprobs(tiny_model, changed, attention_mask, prompt_lengths, T)
    others = [i for i in range(len(mask)) if i != first]
    assert torch.equal((before * mask)[others], (after * mask)[others])
    assert not torch.equal((before * mask)[first], (after * mask)[first])


def test_micro_batches_keep_the_budget_and_balance():
    lengths = [900, 120, 640, 300, 300, 75, 1500, 40, 512]
    parts = token_budget_micro_batches(lengths, 1024)
    assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in part) for part in parts]
    assert all(load <= 1024 or len(part) == 1 for load, part in zip(loads, parts)), loads
    assert len(parts) <= 6  # 4,387 tokens, one row over the budget alone
    assert token_budget_micro_batches(lengths, None) == [list(range(len(lengths)))]
    shares = balanced_parts(lengths, 2)
    assert abs(sum(lengths[i] for i in shares[0]) - sum(lengths[i] for i in shares[1])) <= max(lengths)


def _batch() -> TrainBatch:
    # 8, 11, 8, 9, 8 and 3 tokens: the 3 shares a row, so packing holds fewer slots than padding.
    return ragged_batch([(5, 3), (2, 9), (7, 1), (3, 6), (4, 4), (2, 1)], seed=1)


def test_the_learner_packs_only_where_it_saves_slots():
    """Sequences that all need a row of their own (equal lengths) run as the padded rows they are;
    one that fits beside another makes the micro-batch packed."""
    from rlhf_cluster.learner.micro_batches import micro_batch

    cpu = torch.device("cpu")
    same = ragged_batch([(4, 4), (5, 3), (6, 2)], seed=2)  # 8 tokens each
    assert micro_batch(same, [0, 1, 2], True, True, cpu, "sdpa").packing is None
    assert micro_batch(same, [0, 1, 2], True, True, cpu, "flash_attention_2").packing is None  # no padding at all
    mixed = ragged_batch([(4, 4), (2, 1), (5, 3), (2, 2)], seed=2)  # 8, 3, 8, 4 tokens
    packing = micro_batch(mixed, [0, 1, 2, 3], True, True, cpu, "sdpa").packing
    assert packing is not None and packing.gather.numel() < 4 * mixed.input_ids.shape[1]
    assert micro_batch(mixed, [0, 1, 2, 3], True, False, cpu, "sdpa").packing is None  # sequence_packing: false


@pytest.mark.parametrize("budget", [None, 12])
def test_a_packed_learner_step_equals_a_padded_one(gloo_group, tiny_model_path, budget):
    """The same step (two mini-batches, so the π_prox forward runs too) packed and padded: the same
    loss and the same weights after it, with and without a token budget cutting micro-batches."""
    results = []
    for packing in (False, True):
        cfg = JobConfig.model_validate({"learner": {"world_size": 1, "lr": 1e-2, "sequence_packing": packing,
                                                    "max_tokens_per_micro_batch": budget, "mini_batches": 2},
                                        "algorithm": {"kl": {"placement": "loss", "coef": 0.1}}})
        learner = FSDP2Learner(LearnerSpec.of_policy(cfg), tiny_model_path)
        metrics = learner.train_step(_batch(), kl_coef=0.1)
        results.append((metrics, {k: v.detach().clone() for k, v in learner.full_state_dict().items()}))
    (padded, padded_weights), (packed, packed_weights) = results
    assert packed["policy/loss"] == pytest.approx(padded["policy/loss"], abs=1e-5)
    assert packed["learner/grad_norm"] == pytest.approx(padded["learner/grad_norm"], rel=1e-4)
    # AdamW moves a weight by about lr per update whatever its gradient's size, so float rounding
    # between the two paths shows in the weights at a fraction of lr (measured up to 1.8e-4 at lr
    # 1e-2, where a gradient is near AdamW's eps); 5e-4 is 5% of one update. A row attending to
    # another would already move the loss far past the 1e-5 above.
    for name, weight in padded_weights.items():
        assert torch.allclose(weight, packed_weights[name], atol=5e-4), (name, (weight - packed_weights[name]).abs().max())


def test_rank_shares_have_equal_rows_and_near_equal_tokens():
    lengths = [900, 120, 640, 300, 300, 75, 1500, 40, 512, 33]
    shares = balanced_shares(lengths, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(lengths)))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    loads = [sum(lengths[i] for i in share) for share in shares]
    round_robin = [sum(lengths[r::3]) for r in range(3)]
    assert max(loads) - min(loads) < max(round_robin) - min(round_robin), (loads, round_robin)
