"""Built-in visual tasks for vision-language policies, drawn on the fly with Pillow.

Each prompt is a small square image of 1..max_dots coloured dots on white, apart from each other
so that they can be counted, and a question:

- `visual_count`: "How many dots are in the image? Answer with a number." (the answer: the
  count); each dot has a random colour.
- `visual_color`: "What colour are the dots? Answer with one word." (the answer: the colour's
  name); all dots have one colour.

The images are PNG bytes in the prompt file's `images` column (a column a user's dataset can
hold too), made from a seeded generator: the same seed, split and settings give the same bytes.
The train and eval splits draw from different streams of one seed, and from disjoint sets of
images: one image in five (by a hash of its dots) is held out, never drawn for training.
"""

from __future__ import annotations

import hashlib
import io
import math
import random

from rlhf_cluster.data.tasks import IMAGE_COLUMN, verify_arithmetic

VISUAL_TASKS = ("visual_count", "visual_color")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
HELD_OUT_EVERY = 5  # one image in this many (by a hash of its dots) is only ever an eval image
QUESTIONS = {
    "visual_count": "How many dots are in the image? Answer with a number.",
    "visual_color": "What colour are the dots? Answer with one word.",
}


def dot_layout(size: int, max_dots: int) -> tuple[int, int]:
    """The grid (cells per side) and dot radius of a `size`-pixel image of up to `max_dots` dots:
    a square grid with a cell for each dot, the radius leaving two pixels between neighbours, and
    at most a fourteenth of the image; a single dot (`max_dots` 1) is a disc a third of the image
    across, so its colour is much of what the image shows (the vlm demo's task), and where it sits
    varies enough for a held-out fifth of the images to hold every colour."""
    grid = math.ceil(math.sqrt(max_dots))
    cell = size // grid
    return grid, max(1, cell // 3 if max_dots == 1 else min(size // 14, (cell - 3) // 2))


def dot_centres(rng: random.Random, count: int, size: int, max_dots: int) -> list[tuple[int, int]]:
    """`count` dot centres in a `size`-pixel square: distinct cells of the grid, a random place
    in each, so that dots never touch (each is whole and at least two pixels from the next)."""
    grid, radius = dot_layout(size, max_dots)
    cell = size // grid
    cells = rng.sample(range(grid * grid), count)
    low, high = radius + 1, max(radius + 1, cell - radius - 2)
    return [((c % grid) * cell + rng.randint(low, high), (c // grid) * cell + rng.randint(low, high)) for c in cells]


def draw_dots(centres: list[tuple[int, int]], colors: list[str], size: int, radius: int) -> bytes:
    """A white `size`-pixel square with a filled dot at each centre, as PNG bytes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for (x, y), name in zip(centres, colors):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=COLORS[name])
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def visual_rows(task: str, num: int, seed: int, split: str = "train", size: int = 56, max_dots: int = 5) -> list[dict]:
    """`num` prompt rows of a visual task: `prompt_id`, `prompt`, `answer`, and `images` (a list
    of one PNG image's bytes)."""
    if task not in VISUAL_TASKS:
        raise ValueError(f"data.task: {task!r} is not a visual task ({list(VISUAL_TASKS)})")
    rng = random.Random(f"{task}-{seed}-{split}")
    radius = dot_layout(size, max_dots)[1]
    rows = []
    for i in range(num):
        centres, colors = _draw_layout(task, rng, size, max_dots, held_out=split == "eval")
        answer = str(len(centres)) if task == "visual_count" else colors[0]
        rows.append(
            {
                "prompt_id": f"{split}-{i}",
                "prompt": QUESTIONS[task],
                "answer": answer,
                IMAGE_COLUMN: [draw_dots(centres, colors, size, radius)],
            }
        )
    return rows


def is_held_out(centres: list[tuple[int, int]], colors: list[str]) -> bool:
    """Whether an image (its dots, in any order) is one of the fifth held out for evaluation: a
    hash of what it shows, so no image a train split draws is ever an eval image."""
    key = repr(sorted(zip(centres, colors))).encode()
    return hashlib.sha256(key).digest()[0] % HELD_OUT_EVERY == 0


def _draw_layout(
    task: str, rng: random.Random, size: int, max_dots: int, held_out: bool
) -> tuple[list[tuple[int, int]], list[str]]:
    """One image's dots and colours, drawn until it is on the split's side of `is_held_out`."""
    names = sorted(COLORS)
    for _ in range(1000):
        count = rng.randint(1, max_dots)
        centres = dot_centres(rng, count, size, max_dots)
        colors = [rng.choice(names) for _ in range(count)] if task == "visual_count" else [rng.choice(names)] * count
        if is_held_out(centres, colors) == held_out:
            return centres, colors
    raise AssertionError("no image on this side of the held-out split in 1000 draws")  # 1 in 5 is held out


def visual_corpus(num: int = 200, seed: int = 1234) -> list[str]:
    """Text a tiny vision-language model's tokenizer is trained on: both tasks' questions and
    every answer they can have."""
    answers = [str(n) for n in range(1, 13)] + sorted(COLORS)
    texts = [q + " " + a for q in QUESTIONS.values() for a in answers]
    rng = random.Random(seed)
    return texts * max(1, num // len(texts)) + [rng.choice(texts) for _ in range(num % len(texts))]


def verify_count(response: str, answer: str) -> dict[str, float]:
    """`visual_count`: the response is exactly the count, plus the dense `digits` term of the
    arithmetic task (a random model's responses get a learnable signal)."""
    return verify_arithmetic(response, answer)


def verify_color(response: str, answer: str) -> dict[str, float]:
    """`visual_color`: the response is the colour's name (case, spaces and a final `.` aside);
    `known` is 1 when it names any of the task's colours at all (recorded, weight 0)."""
    given = response.strip().rstrip(".").strip().lower()
    return {"correct": float(given == answer.strip().lower()), "known": float(given in COLORS)}
