"""The built-in visual tasks: images drawn with Pillow from a seed (the same seed, split and
settings give the same bytes), answers that match the picture, their verifiers, and their files
read back through the same reader a user's dataset takes."""

from __future__ import annotations

import io
import pickle

import pytest
from PIL import Image

from rlhf_cluster.config import DataConfig
from rlhf_cluster.data.prompts import prepare_prompt_files, read_prompt_file
from rlhf_cluster.data.verifiers import build_verifier
from rlhf_cluster.data.visual_task import COLORS, QUESTIONS, dot_layout, visual_corpus, visual_rows


def _dots(png: bytes) -> tuple[int, set[tuple[int, int, int]]]:
    """How many separate coloured blobs an image has (4-connected non-white pixels), and their colours."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = image.size
    pixels = image.load()
    seen: set[tuple[int, int]] = set()
    blobs, colors = 0, set()
    for x in range(w):
        for y in range(h):
            if (x, y) in seen or pixels[x, y] == (255, 255, 255):
                continue
            blobs += 1
            colors.add(pixels[x, y])
            stack = [(x, y)]
            while stack:
                a, b = stack.pop()
                if (a, b) in seen or not (0 <= a < w and 0 <= b < h) or pixels[a, b] == (255, 255, 255):
                    continue
                seen.add((a, b))
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return blobs, colors


@pytest.mark.parametrize("task", ["visual_count", "visual_color"])
def test_rows_are_deterministic_per_seed_and_split(task):
    rows = visual_rows(task, 20, seed=3)
    assert rows == visual_rows(task, 20, seed=3)
    assert [r["images"] for r in rows] != [r["images"] for r in visual_rows(task, 20, seed=4)]
    assert [r["images"] for r in rows] != [r["images"] for r in visual_rows(task, 20, seed=3, split="eval")]
    assert {r["prompt"] for r in rows} == {QUESTIONS[task]}
    assert [r["prompt_id"] for r in rows] == [f"train-{i}" for i in range(20)]


@pytest.mark.parametrize(("size", "max_dots"), [(56, 5), (28, 12), (112, 9)])
def test_the_answer_is_what_the_image_shows(size, max_dots):
    for row in visual_rows("visual_count", 25, seed=0, size=size, max_dots=max_dots):
        (png,) = row["images"]
        assert Image.open(io.BytesIO(png)).size == (size, size)
        blobs, _ = _dots(png)
        assert str(blobs) == row["answer"] and 1 <= blobs <= max_dots
    for row in visual_rows("visual_color", 10, seed=0, size=size, max_dots=max_dots):
        blobs, colors = _dots(row["images"][0])
        assert colors == {COLORS[row["answer"]]}  # one colour, drawn without antialiasing
    counts = {r["answer"] for r in visual_rows("visual_count", 200, seed=0, size=size, max_dots=max_dots)}
    assert counts == {str(n) for n in range(1, max_dots + 1)}


def test_dots_fit_at_the_smallest_image_and_most_dots():
    grid, radius = dot_layout(28, 12)
    assert grid == 4 and radius >= 1
    assert dot_layout(56, 5) == (3, 4)
    assert dot_layout(56, 1) == (1, 18)  # one dot: a disc a third of the image across


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="not a visual task"):
        visual_rows("arithmetic", 1, 0)


def test_count_and_color_verifiers():
    count, weights = build_verifier("visual_count")
    assert count(" 3\n", "3") == {"correct": 1.0, "digits": 1.0}
    assert count("3 dots", "3")["correct"] == 0.0 and count("4", "3")["correct"] == 0.0
    assert weights == {"correct": 1.0, "digits": 0.2}
    color, weights = build_verifier("visual_color")
    assert color(" Red.", "red") == {"correct": 1.0, "known": 1.0}
    assert color("blue", "red") == {"correct": 0.0, "known": 1.0}
    assert color("a red dot", "red") == {"correct": 0.0, "known": 0.0}
    assert weights == {"correct": 1.0, "known": 0.0}  # recorded, not rewarded


def test_corpus_holds_every_question_and_answer():
    text = " ".join(visual_corpus())
    assert all(q in text for q in QUESTIONS.values()) and all(c in text for c in COLORS)


def test_the_task_file_is_read_back_with_its_images(tmp_path):
    cfg = DataConfig(task="visual_count", num_prompts=12, eval_prompts=4, seed=5, image_size=56)
    train, held_out = prepare_prompt_files(cfg, tmp_path)
    prompts = read_prompt_file(train)
    expected = visual_rows("visual_count", 12, 5, "train", 56, 5)
    assert [p.images for p in prompts] == [tuple(r["images"]) for r in expected]
    assert [p.answer for p in prompts] == [r["answer"] for r in expected]
    assert held_out is not None and len(read_prompt_file(held_out)) == 4
    assert pickle.loads(pickle.dumps(prompts)) == prompts
    # The same settings write the same bytes (a resumed job's prompts are the ones it started with).
    again, _ = prepare_prompt_files(cfg, tmp_path / "again")
    assert again.read_bytes() == train.read_bytes()


@pytest.mark.parametrize("task", ["visual_count", "visual_color"])
def test_train_never_draws_an_eval_image(task):
    # 28 pixels and one dot (a disc of radius 9): 384 images (8 x 8 places x 6 colours), where 400 and 60
    # draws would meet dozens of times by chance.
    train = {r["images"][0] for r in visual_rows(task, 400, seed=0, size=28, max_dots=1)}
    held_out = {r["images"][0] for r in visual_rows(task, 60, seed=0, split="eval", size=28, max_dots=1)}
    assert not train & held_out
    assert len(train) > 50 and len(held_out) > 5
