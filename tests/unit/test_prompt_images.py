"""Images in a prompt file (`data.columns.images`): every form a dataset holds them in (bytes,
a path relative to the file, a `datasets` Image feature, one or a list per row) comes back as
the same encoded bytes on the prompt; every bad image is refused naming its file and row; the
chat template places the images; a prompt with images survives pickling."""

from __future__ import annotations

import io
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rlhf_cluster.config import PromptColumns
from rlhf_cluster.data.chat_template import apply_chat_template
from rlhf_cluster.data.eval_split import content_key, split_by_fraction
from rlhf_cluster.data.images import ImageError, check_image, describe_images, image_tokens, resized_size
from rlhf_cluster.data.prompts import Prompt, read_prompt_file

COLUMNS = PromptColumns(images="image")


def _png(color=(200, 0, 0), size=(30, 20), fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


RED, BLUE = _png(), _png((0, 0, 200), (40, 40), "JPEG")


def _parquet(path, images, type_=None):
    rows = {"prompt_id": [f"p{i}" for i in range(len(images))], "prompt": ["what?"] * len(images), "image": images}
    schema = (
        None if type_ is None else pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("image", type_)])
    )
    pq.write_table(pa.table(rows, schema=schema), path)
    return path


def _refusal(path, columns=COLUMNS, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        read_prompt_file(path, columns, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


# ---- the forms of an image ----------------------------------------------------------------------
def test_bytes_one_or_a_list_per_row(tmp_path):
    one = read_prompt_file(_parquet(tmp_path / "one.parquet", [RED, BLUE]), COLUMNS)
    assert [p.images for p in one] == [(RED,), (BLUE,)]
    many = read_prompt_file(_parquet(tmp_path / "many.parquet", [[RED, BLUE], [], None]), COLUMNS)
    assert [p.images for p in many] == [(RED, BLUE), (), ()]


def test_paths_relative_to_the_file_and_absolute(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(RED)
    (tmp_path / "blue.jpg").write_bytes(BLUE)
    rows = [{"prompt": "q", "image": "img/red.png"}, {"prompt": "q", "image": str(tmp_path / "blue.jpg")}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.images for p in read_prompt_file(path, COLUMNS)] == [(RED,), (BLUE,)]


def test_a_datasets_image_feature(tmp_path):
    import datasets

    (tmp_path / "blue.jpg").write_bytes(BLUE)
    features = datasets.Features(
        {"prompt": datasets.Value("string"), "answer": datasets.Value("string"), "image": datasets.Image()}
    )
    ds = datasets.Dataset.from_dict(
        {
            "prompt": ["a", "b"],
            "answer": ["1", "2"],
            "image": [Image.open(io.BytesIO(RED)), str(tmp_path / "blue.jpg")],
        },
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "ds.parquet"))
    for path in (tmp_path / "ds", tmp_path / "ds.parquet"):
        prompts = read_prompt_file(path, COLUMNS)
        assert [p.answer for p in prompts] == ["1", "2"]
        # Each holds an image that decodes to the pixels given (the feature may re-encode a PIL image).
        first = Image.open(io.BytesIO(prompts[0].images[0]))
        assert first.size == (30, 20) and first.convert("RGB").getpixel((0, 0)) == (200, 0, 0)
        assert prompts[1].images == (BLUE,)
    # A struct holding only a path (an Image feature not embedded) is read from that path.
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path = _parquet(tmp_path / "struct.parquet", [{"bytes": None, "path": "blue.jpg"}], struct)
    assert read_prompt_file(path, COLUMNS)[0].images == (BLUE,)


# ---- refusals -------------------------------------------------------------------------------------
def test_missing_unreadable_and_non_images_name_the_row_and_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt_id": "a", "prompt": "q", "image": "nowhere.png"}) + "\n")
    message = _refusal(path)
    assert "line 1 (prompt_id 'a')" in message and "nowhere.png: no such file" in message
    bad = _parquet(tmp_path / "bad.parquet", [RED, b"not an image at all"])
    message = _refusal(bad)
    assert "row 2 (prompt_id 'p1')" in message and "not a readable image" in message
    truncated = _parquet(tmp_path / "cut.parquet", [RED[:40]])
    assert "row 1 (prompt_id" in _refusal(truncated) and "not a readable image" in _refusal(truncated)
    numbers = _parquet(tmp_path / "num.parquet", [7], pa.int64())
    assert "row 1 (prompt_id" in _refusal(numbers) and "not an image: expected encoded bytes" in _refusal(numbers)
    empty = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    nothing = _parquet(tmp_path / "nothing.parquet", [{"bytes": None, "path": None}], empty)
    assert "neither bytes nor path" in _refusal(nothing)
    listed = _parquet(tmp_path / "listed.parquet", [[RED, b"junk"]])
    assert "row 1 (prompt_id 'p0'), column 'image': image 1:" in _refusal(listed)
    missing_column = _parquet(tmp_path / "m.parquet", [RED])
    assert "missing column(s) ['pictures']" in _refusal(missing_column, PromptColumns(images="pictures"))


def test_images_over_the_size_limit(tmp_path):
    big = _parquet(tmp_path / "big.parquet", [RED, BLUE])
    message = _refusal(big, max_image_bytes=len(RED))
    assert "row 2 (prompt_id 'p1')" in message and "over data.max_image_bytes" in message
    (tmp_path / "blue.jpg").write_bytes(BLUE)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "image": "blue.jpg"}) + "\n")
    assert "blue.jpg:" in _refusal(path, max_image_bytes=100) and "over data.max_image_bytes" in _refusal(
        path, max_image_bytes=100
    )
    with pytest.raises(ImageError, match="aspect ratio"):
        check_image(_png(size=(1000, 2)), "thin")


def test_message_image_parts_must_match_the_row_images(tmp_path):
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "same?"}]}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": parts, "image": [RED.hex()]}) + "\n")
    # (a hex string is a path here, which does not exist: the image check comes first)
    assert "no such file" in _refusal(path, PromptColumns(messages="messages", images="image"))
    table = pa.table({"messages": [parts], "image": [[RED]]})
    pq.write_table(table, tmp_path / "m.parquet")
    message = _refusal(tmp_path / "m.parquet", PromptColumns(messages="messages", images="image"))
    assert "2 image part(s) and the row has 1 image(s)" in message
    pq.write_table(pa.table({"messages": [parts], "image": [[RED, BLUE]]}), tmp_path / "ok.parquet")
    (prompt,) = read_prompt_file(tmp_path / "ok.parquet", PromptColumns(messages="messages", images="image"))
    assert prompt.images == (RED, BLUE) and prompt.messages[0]["content"][2] == {"type": "text", "text": "same?"}


# ---- prompts with images ------------------------------------------------------------------------
class _Parts:
    """A tokenizer whose template writes `<image>` for each image part (as a VLM's does)."""

    chat_template = "parts"

    def apply_chat_template(self, chat, tokenize, add_generation_prompt):
        def content(c):
            return c if isinstance(c, str) else "".join("<image>" if p["type"] == "image" else p["text"] for p in c)

        text = "".join(f"<{m['role']}>{content(m['content'])}</>" for m in chat) + "<assistant>"
        return [ord(c) for c in text] if tokenize else text


def test_the_chat_template_places_the_images():
    tok = _Parts()
    plain, chat = apply_chat_template(
        [
            Prompt("a", "how many?", "3", images=(RED, BLUE)),
            Prompt("b", "", "4", messages=({"role": "user", "content": "hi"},), images=(RED,)),
        ],
        tok,
        system_prompt="look",
    )
    assert plain.text == "<system>look</><user><image><image>how many?</><assistant>"
    assert plain.images == (RED, BLUE) and plain.token_ids == tuple(ord(c) for c in plain.text)
    assert chat.text == "<system>look</><user><image>hi</><assistant>" and chat.images == (RED,)
    text_only = apply_chat_template([Prompt("c", "1+1=", "2")], tok)[0]
    assert text_only.text == "<user>1+1=</><assistant>" and text_only.images == ()


def test_a_prompt_with_images_pickles_and_keys_by_its_images():
    prompt = Prompt("a", "how many?", "3", token_ids=(1, 2), images=(RED, BLUE))
    assert pickle.loads(pickle.dumps(prompt)) == prompt
    same_text = [Prompt(f"p{i}", "how many?", "3", images=(_png((i, 0, 0)),)) for i in range(10)]
    assert len({content_key(p) for p in same_text}) == 10  # one question of many images is many prompts
    split = split_by_fraction(same_text, 0.3, seed=0)
    assert len(split.held_out) == 3 and len(split.train) == 7


def test_the_processor_sizes():
    assert resized_size(56, 56) == (56, 56)  # already a multiple of 28, within the default bounds
    assert resized_size(30, 20) == (84, 56)  # raised to the 3136-pixel minimum, the aspect ratio kept
    assert resized_size(1000, 10) == (560, 28)  # (the values of transformers' smart_resize)
    assert resized_size(640, 480, max_pixels=28 * 28 * 16) == (112, 84)
    assert resized_size(2000, 2000, max_pixels=200_000) == (420, 420)
    assert image_tokens(56, 56) == 4 and image_tokens(112, 112) == 16


def test_data_urls_and_the_dry_run_description(tmp_path):
    import base64

    url = "data:image/png;base64," + base64.b64encode(RED).decode()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "image": [url, url]}) + "\n")
    assert read_prompt_file(path, COLUMNS)[0].images == (RED, RED)
    path.write_text(json.dumps({"prompt": "q", "image": "data:text/plain;base64,aGk="}) + "\n")
    assert "not a base64 image" in _refusal(path)
    path.write_text(json.dumps({"prompt": "q", "image": "data:image/png;base64,@@@"}) + "\n")
    assert "does not decode" in _refusal(path)
    assert describe_images((RED, BLUE), None, None) == (
        "2 images: 30x20 -> 84x56 (6 tokens), 40x40 -> 56x56 (4 tokens)"
    )
    assert describe_images((), None, None) == "no images"


def test_task_prompts_equal_the_task_file(tmp_path):
    from rlhf_cluster.config import DataConfig
    from rlhf_cluster.data.prompts import prepare_prompt_files, task_prompts

    cfg = DataConfig(task="visual_color", num_prompts=3, eval_prompts=0, seed=1)
    train, _ = prepare_prompt_files(cfg, tmp_path)
    assert task_prompts(cfg, 3) == read_prompt_file(train)
    arithmetic = DataConfig(num_prompts=3, eval_prompts=0, seed=1)
    assert task_prompts(arithmetic, 3) == read_prompt_file(prepare_prompt_files(arithmetic, tmp_path / "a")[0])


def test_a_row_over_the_images_limit_is_refused_naming_it(tmp_path):
    path = _parquet(tmp_path / "p.parquet", [[RED], [RED, BLUE, RED]])
    assert len(read_prompt_file(path, COLUMNS, max_images=3)[1].images) == 3
    message = _refusal(path, max_images=2)
    assert "row 2 (prompt_id 'p1')" in message and "3 images" in message and "max_images_per_prompt=2" in message
