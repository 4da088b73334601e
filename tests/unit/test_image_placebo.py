"""The images placebo: training prompts shown each other's images, a seeded permutation among
prompts with as many images; everything else about each prompt kept."""

from __future__ import annotations

from collections import Counter

from rlhf_cluster.config import DataConfig
from rlhf_cluster.data.placebo import shuffled_images
from rlhf_cluster.data.prompts import Prompt, task_prompts


def test_images_are_permuted_and_nothing_else_changes():
    prompts = task_prompts(DataConfig(task="visual_count", seed=0), 50)
    shuffled, moved = shuffled_images(prompts, seed=1)
    assert shuffled == shuffled_images(prompts, seed=1)[0] and shuffled != shuffled_images(prompts, seed=2)[0]
    assert Counter(p.images for p in shuffled) == Counter(p.images for p in prompts)
    assert [(p.prompt_id, p.text, p.answer) for p in shuffled] == [(p.prompt_id, p.text, p.answer) for p in prompts]
    assert moved == sum(a.images != b.images for a, b in zip(shuffled, prompts)) and moved >= 45
    # The answers no longer go with the images: far fewer prompts keep an image of their own count.
    own = {p.images: p.answer for p in prompts}
    assert sum(own[p.images] == p.answer for p in shuffled) < 25


def test_only_prompts_with_as_many_images_trade():
    one, two = (b"a",), (b"b", b"c")
    prompts = [Prompt("t", "text", "")] + [Prompt(f"o{i}", "q", "", images=one) for i in range(3)]
    prompts += [Prompt("w", "q", "", images=two)]
    shuffled, moved = shuffled_images(prompts, seed=0)
    assert shuffled[0].images == () and shuffled[-1].images == two and moved == 0  # all one-image prompts alike
