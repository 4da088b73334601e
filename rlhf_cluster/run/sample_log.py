"""What a step trained on, readable: the highest- and lowest-reward responses and a few random
ones, decoded, for `RUN_DIR/samples.jsonl` and `rlhf-cluster samples`. Ray-free."""

from __future__ import annotations

import random
import textwrap

from rlhf_cluster.experience.records import ScoredSample

UNTRAINED = ("\u27e6", "\u27e7")  # around the response's tokens the loss does not count (a tool's output)


def pick_samples(samples: list[ScoredSample], top: int, random_count: int, seed: int) -> list[tuple[str, ScoredSample]]:
    """(`top`|`bottom`|`random`, sample): the `top` highest- and lowest-reward samples (ties in
    batch order) and `random_count` others drawn with `seed`; none twice."""
    order = sorted(range(len(samples)), key=lambda i: samples[i].reward)
    top_ids = order[::-1][:top]
    bottom_ids = [i for i in order[:top] if i not in top_ids]
    rest = [i for i in range(len(samples)) if i not in top_ids and i not in bottom_ids]
    random_ids = random.Random(seed).sample(rest, min(random_count, len(rest)))
    return (
        [("top", samples[i]) for i in top_ids]
        + [("bottom", samples[i]) for i in bottom_ids]
        + [("random", samples[i]) for i in sorted(random_ids)]
    )


def sample_rows(step: int, picked: list[tuple[str, ScoredSample]], tokenizer) -> list[dict]:
    """One samples.jsonl row per picked sample: the decoded prompt and response beside their ids."""
    return [
        {
            "step": step,
            "pick": tag,
            "sample_id": s.sample_id,
            "prompt_id": s.prompt_id,
            "reward": s.reward,
            "reward_components": s.reward_components,
            "response_len": len(s.response_ids),
            "finish_reason": s.finish_reason,
            "policy_version": s.policy_version,
            "prompt": tokenizer.decode(s.prompt_ids),
            "response": tokenizer.decode(s.response_ids),
            "prompt_ids": s.prompt_ids,
            "response_ids": s.response_ids,
            # multi-turn: 0 on environment tokens, which the printout marks
            **(
                {"loss_mask": s.loss_mask, "response_parts": _parts(s.response_ids, s.loss_mask, tokenizer)}
                if s.loss_mask is not None
                else {}
            ),
        }
        for tag, s in picked
    ]


def _parts(ids: list[int], mask: list[int], tokenizer) -> list[tuple[bool, str]]:
    """The response as (trained, text) runs: each run of tokens the loss counts (1) or not (0)."""
    parts: list[tuple[bool, str]] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or bool(mask[end]) != bool(mask[start]):
            parts.append((bool(mask[start]), tokenizer.decode(ids[start:end])))
            start = end
    return parts


def fewest_extremes(rows: list[dict], top: int) -> list[dict]:
    """`rows` with only the first `top` of the highest and of the lowest (logged best or worst first)."""
    counts = {"top": 0, "bottom": 0}
    kept = []
    for r in rows:
        if r["pick"] in counts:
            counts[r["pick"]] += 1
            if counts[r["pick"]] > top:
                continue
        kept.append(r)
    return kept


def format_samples(rows: list[dict], width: int = 100) -> str:
    """The rows as text for a terminal: a header per sample, then its prompt and response."""
    out = []
    for r in rows:
        components = ", ".join(f"{k} {v:+.3f}" for k, v in sorted(r["reward_components"].items()))
        out.append(
            f"--- step {r['step']} | {r['pick']} | reward {r['reward']:+.3f}"
            f"{f' ({components})' if components else ''} | {r['response_len']} tokens, {r['finish_reason']} | "
            f"version {r['policy_version']} | {r['sample_id']}"
        )
        parts = r.get("response_parts")
        response = "".join(t if trained else f"{UNTRAINED[0]}{t}{UNTRAINED[1]}" for trained, t in parts or [])
        for label, text in (("prompt", r["prompt"]), ("response", response if parts else r["response"])):
            out.append(f"  {label}:\n" + textwrap.indent(text or "(empty)", "    "))
        if parts and not all(trained for trained, _ in parts):
            out.append(f"  ({UNTRAINED[0]}...{UNTRAINED[1]}: the environment's tokens, not trained on)")
    return "\n".join(out)
