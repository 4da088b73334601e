"""Images of vision-language prompts: read from a dataset's image column and checked.

A row's images may be encoded bytes (PNG, JPEG, anything Pillow opens), a path (relative to the
dataset file's folder, or absolute), a base64 `data:image/...` URL (what a JSON Lines file can
hold), or a `datasets` Image feature (a struct `{bytes, path}`), and a row holds one image or a
list of them. Each comes back as its encoded bytes, unchanged: a
prompt carries a tuple of them (compact, and plain data between processes), never decoded pixels.

Every refusal names the file, the row and the prompt id: a missing or unreadable image, one over
`data.max_image_bytes`, a value that is not an image at all.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from pathlib import Path

# Processors of the Qwen-VL family refuse an image whose sides differ more than this.
MAX_ASPECT_RATIO = 200


class ImageError(ValueError):
    """An image of a dataset that cannot be used (the message names where it is)."""


def row_images(value: object, base: Path, max_bytes: int) -> tuple[bytes, ...]:
    """One row's images as encoded bytes: `value` is an image or a list of images (None: none).

    Raises `ImageError` saying what is wrong with the image; the caller adds which row it is.
    """
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for k, item in enumerate(items):
        try:
            out.append(image_bytes(item, base, max_bytes))
        except ImageError as exc:
            raise ImageError(f"image {k}: {exc}" if len(items) > 1 else str(exc)) from exc
    return tuple(out)


def image_bytes(value: object, base: Path, max_bytes: int) -> bytes:
    """One image's encoded bytes, from bytes, a path or a `{bytes, path}` struct, checked to open."""
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path") is not None:
            value = value["path"]
        else:
            raise ImageError("an Image struct with neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        where = f"{len(data)} bytes"
    elif isinstance(value, str) and value.startswith("data:"):
        data = _data_url(value, max_bytes)
        where = f"a data URL of {len(data)} bytes"
    elif isinstance(value, str):
        data = _read_path(value, base, max_bytes)
        where = value
    else:
        raise ImageError(
            f"not an image: expected encoded bytes, a path or a {{bytes, path}} struct, got "
            f"{type(value).__name__} {str(value)[:80]!r}"
        )
    if len(data) > max_bytes:
        raise ImageError(f"{where}: {len(data):,} bytes, over data.max_image_bytes={max_bytes:,}")
    check_image(data, where)
    return data


def _data_url(value: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/<format>;base64,<data>` URL."""
    head, _, payload = value.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ImageError(f"a data URL that is not a base64 image: {head[:60]!r}")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageError(
            f"a data URL of about {len(payload) * 3 // 4:,} bytes, over data.max_image_bytes={max_bytes:,}"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"a data URL whose base64 does not decode ({exc})") from exc


def _read_path(value: str, base: Path, max_bytes: int) -> bytes:
    if not value.strip():
        raise ImageError("an empty path")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ImageError(f"{value}: no such file ({path})")
    size = path.stat().st_size
    if size > max_bytes:  # refused before it is read
        raise ImageError(f"{value}: {size:,} bytes, over data.max_image_bytes={max_bytes:,}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{value}: unreadable ({exc.strerror or exc})") from exc


def check_image(data: bytes, where: str) -> tuple[int, int]:
    """The (width, height) of encoded image `data`, after checking that Pillow can read it: its
    header, its chunks' checksums where the format has them, sides and aspect ratio."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
                image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{where}: too many pixels ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a bad file; all mean "not an image"
        raise ImageError(f"{where}: not a readable image ({type(exc).__name__}: {exc})") from exc
    width, height = size
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageError(f"{where}: {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}")
    return width, height


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes (the header only)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.size


# Qwen2-VL's image processor defaults: 14-pixel patches merged 2x2 (a 28-pixel factor), and the
# pixel bounds its preprocessor_config.json ships with.
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280


def resized_size(
    width: int,
    height: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    factor: int = QWEN_FACTOR,
) -> tuple[int, int]:
    """The (width, height) a Qwen-VL processor resizes an image to: each side a multiple of
    `factor`, the area kept within [min_pixels, max_pixels] (None: the processor's defaults),
    the aspect ratio as close as that allows (its `smart_resize`)."""
    low = QWEN_MIN_PIXELS if min_pixels is None else min_pixels
    high = QWEN_MAX_PIXELS if max_pixels is None else max_pixels
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > high:
        beta = math.sqrt(height * width / high)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < low:
        beta = math.sqrt(low / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def describe_images(images: tuple[bytes, ...], min_pixels: int | None, max_pixels: int | None) -> str:
    """What a dry run shows of a prompt's images: each one's size, the size a Qwen-VL processor
    resizes it to within [min_pixels, max_pixels] (`data.min_pixels` / `max_pixels`; None: its
    defaults), and the image tokens that gives."""
    if not images:
        return "no images"
    sizes = []
    for data in images:
        w, h = image_size(data)
        rw, rh = resized_size(w, h, min_pixels, max_pixels)
        sizes.append(f"{w}x{h} -> {rw}x{rh} ({image_tokens(w, h, min_pixels, max_pixels)} tokens)")
    return f"{len(images)} image{'s' if len(images) > 1 else ''}: " + ", ".join(sizes)


def image_tokens(width: int, height: int, min_pixels: int | None = None, max_pixels: int | None = None) -> int:
    """The placeholder tokens a Qwen-VL prompt holds for one image: its resized area in 28x28 cells."""
    w, h = resized_size(width, height, min_pixels, max_pixels)
    return (w // QWEN_FACTOR) * (h // QWEN_FACTOR)
