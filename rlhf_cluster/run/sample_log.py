"""What a step trained on, readable: the highest- and lowest-reward responses and a few random
ones, decoded, for `RUN_DIR/samples.jsonl` and `rlhf-cluster samples`. Ray-free."""

from __future__ import annotations

import random
import textwrap

from rlhf_cluster.experience.records import ScoredSample


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
            **({"loss_mask": s.loss_mask} if s.loss_mask is not None else {}),  # multi-turn: 0 on environment tokens
        }
        for tag, s in picked
    ]


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
        for label in ("prompt", "response"):
            text = r[label].replace("\n", "\n    ") or "(empty)"
            out.append(f"  {label}:\n" + textwrap.indent(text, "    "))
    return "\n".join(out)
