"""The held-out prompts of a job on the user's data: a seeded split of its prompt file, or of its
files' union (`data.eval_fraction`), or a file or list of its own (`data.eval_path`), never trained on.

"Never trained on" is by content, not by id: a prompt file may repeat a prompt under another id,
so prompts are grouped by what the engine would see (the text, or the chat messages and system
prompt) and a group is wholly train or wholly held out; a train prompt that repeats a held-out one
is dropped from training (and counted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf_cluster.data.prompts import Prompt

log = logging.getLogger(__name__)


def content_key(prompt: Prompt) -> str:
    """What identifies a prompt's content: its chat messages when it has them, else its text;
    and its images' digest when it has images (one question asked of many images is many prompts)."""
    text = json.dumps(list(prompt.messages), sort_keys=True) if prompt.messages else prompt.text
    if not prompt.images:
        return text
    digest = hashlib.sha256(b"".join(hashlib.sha256(image).digest() for image in prompt.images)).hexdigest()
    return f"{text}\nimages:{digest}"


@dataclass
class EvalSplit:
    """The prompts a job trains on and the held-out ones it evaluates on (disjoint by content)."""

    train: list[Prompt]
    held_out: list[Prompt]
    dropped_repeats: int  # train prompts dropped for repeating a held-out prompt's content

    def write(self, path: Path) -> None:
        """The held-out prompt ids, for audit (`<run_dir>/data/held_out.json`). A resume whose split
        differs from the run's earlier one (its prompt files changed, or a list of them was reordered)
        is warned of: earlier held-out prompts may now be trained on."""
        if path.exists():
            earlier = set(json.loads(path.read_text()).get("held_out_ids", []))
            now_trained = earlier - {p.prompt_id for p in self.held_out}
            if now_trained:
                log.warning(
                    f"{path}: {len(now_trained)} of the run's {len(earlier)} earlier held-out prompts are held out "
                    f"no longer (e.g. {sorted(now_trained)[0]!r}): the prompt files changed since, or their list's "
                    "order; evaluation is no longer on prompts never trained on"
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"held_out_ids": [p.prompt_id for p in self.held_out], "dropped_train_repeats": self.dropped_repeats},
                indent=1,
            )
        )
        tmp.replace(path)


def split_by_fraction(prompts: list[Prompt], fraction: float, seed: int) -> EvalSplit:
    """`fraction` of the distinct prompt contents (rounded up, at least one, never all), chosen by
    a seeded shuffle, held out with every prompt that repeats them."""
    keys = list(dict.fromkeys(content_key(p) for p in prompts))
    if len(keys) < 2:
        raise ValueError(
            f"data.eval_fraction={fraction}: the prompt file has {len(keys)} distinct prompt(s); "
            "a split needs at least 2 (or give held-out prompts in data.eval_path)"
        )
    count = min(max(1, math.ceil(fraction * len(keys))), len(keys) - 1)
    order = keys[:]
    random.Random(f"eval-split-{seed}").shuffle(order)
    held = set(order[:count])
    return EvalSplit(
        [p for p in prompts if content_key(p) not in held], [p for p in prompts if content_key(p) in held], 0
    )


def split_by_file(prompts: list[Prompt], held_out: list[Prompt], source: str) -> EvalSplit:
    """The held-out prompts of `source`; train prompts repeating one of them are dropped."""
    held = {content_key(p) for p in held_out}
    train = [p for p in prompts if content_key(p) not in held]
    if not train:
        raise ValueError(
            f"data.eval_path={source}: every training prompt repeats a held-out one; nothing is left to train on"
        )
    return EvalSplit(train, held_out, len(prompts) - len(train))


def evaluated(held_out: list[Prompt], limit: int, seed: int) -> list[Prompt]:
    """At most `limit` of the held-out prompts (a seeded choice, in file order): what each
    evaluation runs, so its cost stays bounded however large the held-out set."""
    if len(held_out) <= limit:
        return held_out
    chosen = set(random.Random(f"eval-subset-{seed}").sample(range(len(held_out)), limit))
    return [p for i, p in enumerate(held_out) if i in chosen]
