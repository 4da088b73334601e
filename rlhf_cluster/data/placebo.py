"""The images placebo (`data.placebo_images`): a control for vision-language training.

Each training prompt gets the images of another prompt (a seeded permutation among the prompts
with as many images), so a prompt's answer says nothing about the images it is shown. A policy
that still improves on held-out prompts (which keep their own images) learned something other
than reading images: the answers' distribution, the question's wording. Real training has to
beat this run, as the reward placebo's spread is the seed noise a real improvement must beat.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

from rlhf_cluster.data.prompts import Prompt


def shuffled_images(prompts: list[Prompt], seed: int) -> tuple[list[Prompt], int]:
    """`prompts` with their images permuted among prompts with the same number of images, and
    how many prompts were shown images other than their own (a prompt may draw its own back)."""
    by_count: dict[int, list[int]] = defaultdict(list)
    for n, p in enumerate(prompts):
        if p.images:
            by_count[len(p.images)].append(n)
    out = list(prompts)
    moved = 0
    rng = random.Random(f"placebo-images-{seed}")
    for count in sorted(by_count):
        rows = by_count[count]
        order = rows[:]
        rng.shuffle(order)
        for row, source in zip(rows, order):
            out[row] = dataclasses.replace(prompts[row], images=prompts[source].images)
            moved += prompts[source].images != prompts[row].images
    return out, moved
