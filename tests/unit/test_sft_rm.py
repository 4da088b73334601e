"""SFT labels cover exactly the assistant tokens; the reward model reads the last valid token under
both padding sides; the SFT and Bradley-Terry losses match float64 references."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from rlhf_cluster.algorithms import bradley_terry_loss, sft_loss
from rlhf_cluster.data.sft import IGNORE_INDEX, SFTExample, collate, read_sft_file, tokenize_conversation
from rlhf_cluster.models.scalar_head import RewardModel, last_token_index


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def _decode_labelled(tok, example: SFTExample) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_single_turn_labels_only_the_response_and_its_eos(tokenizer):
    ex = tokenize_conversation(tokenizer, [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}])
    assert len(ex.labels) == len(ex.input_ids)
    labelled = [i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX]
    assert labelled == list(range(labelled[0], labelled[-1] + 1)), "one contiguous assistant span"
    assert [ex.input_ids[i] for i in labelled] == [ex.labels[i] for i in labelled]
    assert _decode_labelled(tokenizer, ex).replace(" ", "") == "7" + tokenizer.eos_token + "\n"
    assert "3+4" in tokenizer.decode(ex.input_ids[: labelled[0]]).replace(" ", "")


def test_multi_turn_labels_every_assistant_turn_and_nothing_else(tokenizer):
    messages = [
        {"role": "system", "content": "add"},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+5="},
        {"role": "assistant", "content": "7"},
    ]
    ex = tokenize_conversation(tokenizer, messages)
    labelled = [i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX]
    spans = [[labelled[0]]]
    for i in labelled[1:]:
        (spans[-1].append(i) if i == spans[-1][-1] + 1 else spans.append([i]))
    assert len(spans) == 2, "two assistant turns, two labelled spans"
    texts = [tokenizer.decode([ex.input_ids[i] for i in span]).replace(" ", "") for span in spans]
    assert texts == ["2" + tokenizer.eos_token + "\n", "7" + tokenizer.eos_token + "\n"]
    unlabelled = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE_INDEX])
    assert "1+1=" in unlabelled.replace(" ", "") and "2+5=" in unlabelled.replace(" ", "")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_with_eos_as_pad_never_labels_padding(tokenizer, side):
    eos = tokenizer.eos_token_id
    short = tokenize_conversation(tokenizer, [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}])
    long = tokenize_conversation(tokenizer, [{"role": "user", "content": "12+13="}, {"role": "assistant", "content": "25"}])
    batch = collate([short, long], pad_id=eos, padding_side=side)
    pads = batch["attention_mask"] == 0
    assert pads.sum() == len(long.input_ids) - len(short.input_ids)
    assert (batch["input_ids"][pads] == eos).all(), "pads carry the EOS id"
    assert (batch["labels"][pads] == IGNORE_INDEX).all(), "...and are never labelled"
    # The real EOS closing each answer is labelled: the mask came from lengths, not ids.
    for row, ex in enumerate((short, long)):
        assert int((batch["labels"][row] == eos).sum()) == ex.labels.count(eos) == 1


def test_sft_file_errors_name_file_row_and_field(tmp_path):
    good = tmp_path / "sft.jsonl"
    good.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    assert read_sft_file(good)[0][1] == {"role": "assistant", "content": "2"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: no assistant message"):
        read_sft_file(bad)
    cols = tmp_path / "cols.jsonl"
    cols.write_text(json.dumps({"question": "1+1="}) + "\n")
    with pytest.raises(ValueError, match=r"cols.jsonl: expected columns prompt \+ response, or messages"):
        read_sft_file(cols)


def test_sft_loss_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[:, :2] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    loss, metrics = sft_loss(logits, labels)
    ref_terms = []
    for b in range(3):
        for t in range(5):
            if labels[b, t + 1] != IGNORE_INDEX:
                ref_terms.append(-torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]])
    ref = torch.stack(ref_terms).mean()
    assert abs(float(loss) - float(ref)) < 1e-6 and metrics["tokens"] == len(ref_terms)
    # A global denominator: halves summed with the whole batch's count give the whole batch's loss.
    a, _ = sft_loss(logits[:2], labels[:2], denominator=len(ref_terms))
    b, _ = sft_loss(logits[2:], labels[2:], denominator=len(ref_terms))
    assert abs(float(a + b) - float(ref)) < 1e-6


def test_bradley_terry_loss_and_accuracy_match_a_float64_reference():
    g = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(64, generator=g), torch.randn(64, generator=g)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    gap = chosen.double() - rejected.double()
    ref = torch.log1p(torch.exp(-gap)).mean()
    assert abs(float(loss) - float(ref)) < 1e-6
    assert metrics["accuracy"] == pytest.approx(float((gap > 0).double().mean()))
    with_margin, _ = bradley_terry_loss(chosen, rejected, margin=0.5)
    assert abs(float(with_margin) - float(torch.log1p(torch.exp(-(gap - 0.5))).mean())) < 1e-6
    # Gradient direction: chosen up, rejected down.
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    bradley_terry_loss(c, r)[0].backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


def test_last_token_index_for_both_padding_sides():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4]
    assert last_token_index(left).tolist() == [4, 4]


def test_reward_model_scores_the_same_text_the_same_under_both_padding_sides(tiny_model_path, tokenizer, tmp_path):
    rm = RewardModel.from_lm(tiny_model_path).eval()
    with torch.no_grad():
        torch.nn.init.normal_(rm.head.weight, std=0.5)  # scores far from 0, so a wrong token shows
    texts = ["1+1=2", "12+13=25 and more tokens"]
    examples = [SFTExample(tokenizer(t)["input_ids"], []) for t in texts]
    for e in examples:
        e.labels = [IGNORE_INDEX] * len(e.input_ids)
    scores = {}
    with torch.no_grad():
        for side in ("right", "left"):
            batch = collate(examples, pad_id=tokenizer.eos_token_id, padding_side=side)
            scores[side] = rm(batch["input_ids"], batch["attention_mask"])
        alone = torch.stack([rm(torch.tensor([e.input_ids]), torch.ones(1, len(e.input_ids), dtype=torch.long))[0]
                             for e in examples])
    assert torch.allclose(scores["right"], scores["left"], atol=1e-5), scores
    assert torch.allclose(scores["right"], alone, atol=1e-5)
    assert abs(float(scores["right"][0] - scores["right"][1])) > 1e-3, "different texts score differently"
    # Round trip through save/load.
    rm.save_pretrained(tmp_path / "rm", tokenizer)
    again = RewardModel.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        batch = collate(examples, pad_id=0)
        assert torch.equal(again(batch["input_ids"], batch["attention_mask"]), rm(batch["input_ids"], batch["attention_mask"]))
    with pytest.raises(FileNotFoundError, match="reward_model.json"):
        RewardModel.from_pretrained(tiny_model_path)


def test_lm_regularization_adds_the_starting_lms_loss_on_chosen_responses_only(gloo_group, tiny_model_path, tokenizer,
                                                                              tmp_path):
    """`reward_model.lm_regularization`: the LM term is the starting LM's own NLL of the chosen
    responses (prompts and rejected responses unlabelled), the reported loss stays the pairwise one,
    and the saved reward model is backbone + head alone."""
    from transformers import AutoModelForCausalLM

    from rlhf_cluster.config import StageConfig
    from rlhf_cluster.data.sft import plain_parts
    from rlhf_cluster.learner.supervised import SupervisedTrainer

    pairs = [("3+4=", "7", "8"), ("9+9=", "18", "17"), ("0+5=", "5", "12")]
    chosen, rejected, prompt_lengths = [], [], []
    for prompt, good, bad in pairs:
        p, r = plain_parts(tokenizer, prompt, good)
        chosen.append(p + r)
        rejected.append(sum(plain_parts(tokenizer, prompt, bad), []))
        prompt_lengths.append(len(p))
    # The reference: the starting LM's mean NLL over the chosen responses' tokens (and their EOS).
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, p in zip(chosen, prompt_lengths):
            logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0].double(), -1)
            nll -= sum(float(logp[t - 1, ids[t]]) for t in range(p, len(ids)))
            count += len(ids) - p

    stages = {w: StageConfig(lm_regularization=w, lr=1e-3, seed=0) for w in (0.0, 1.0)}
    plain = SupervisedTrainer("reward_model", tiny_model_path, stages[0.0], tokenizer.pad_token_id)
    regularised = SupervisedTrainer("reward_model", tiny_model_path, stages[1.0], tokenizer.pad_token_id)
    assert plain.model.lm_head is None and regularised.model.lm_head is not None
    a = plain.rm_step(chosen, rejected, [0.0] * 3, prompt_lengths)
    b = regularised.rm_step(chosen, rejected, [0.0] * 3, prompt_lengths)
    assert "lm_nll" not in a and b["lm_nll"] == pytest.approx(nll / count, rel=1e-5)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # same start, same pairwise loss
    assert b["grad_norm"] != pytest.approx(a["grad_norm"], rel=1e-3)  # ... but the LM term moved the gradient
    with pytest.raises(ValueError, match="prompt length"):
        regularised.rm_step(chosen, rejected, [0.0] * 3)

    saved = regularised.save(tmp_path / "rm", tiny_model_path, tiny_model_path)
    served = RewardModel.from_pretrained(saved)
    assert served.lm_head is None and not any(k.startswith("lm_head") for k in served.state_dict())
    with pytest.raises(ValueError, match="is a reward model"):
        RewardModel.from_lm(saved, keep_lm_head=True)
