"""Images in the gateway's chat requests: OpenAI `image_url` content parts read into encoded bytes.

A part's URL is a base64 data URL (`data:image/png;base64,...`), decoded here and checked to be
within the size limit and to open as an image (Pillow); an http(s) URL is refused unless
`generation.agent.image_urls: any`, which fetches it (size-capped, timed out). Every refusal is a
400 naming the message and part (`messages[2].content[1].image_url`). A request with more images
than the engine takes per prompt (vLLM's `limit_mm_per_prompt`), with any image for a policy
that takes none, or with the image placeholder token written as text, is refused too: vLLM would
refuse the first and misplace the images of the last, and the learner could not train on either.

The images of a prompt reach the agent the same way (`agent_messages`): each `{type: image}` part
of the prompt's messages becomes an `image_url` part holding the image as a data URL, so an agent
that forwards its messages sends the prompt's images back to the gateway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlhf_cluster.data.images import ImageError, check_image
from rlhf_cluster.data.prompts import MAX_IMAGE_BYTES, Prompt
from rlhf_cluster.gateway.requests import RequestRefused

FETCH_TIMEOUT_S = 10.0
IMAGE_PART = "image_url"


def fetch_url(url: str, max_bytes: int, timeout_s: float = FETCH_TIMEOUT_S) -> bytes:
    """The bytes at an http(s) URL, at most `max_bytes` of them (`image_urls: any` only)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http(s) checked by the caller
        data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError(f"{url[:80]}: over {max_bytes:,} bytes")
    return data


@dataclass(frozen=True)
class ImagePolicy:
    """What the gateway takes: at most `max_images` images a request (the engine's
    `limit_mm_per_prompt`; 0: a text-only policy), each at most `max_bytes` encoded; `urls`:
    `data` (data URLs only) or `any` (http(s) URLs fetched with `fetch`). `image_token_id` and
    `placeholder`: the image placeholder token and its text, which no text part may hold."""

    max_images: int = 0
    max_bytes: int = MAX_IMAGE_BYTES
    urls: str = "data"
    image_token_id: int | None = None
    placeholder: str | None = None
    fetch: Callable[[str, int], bytes] = fetch_url


TEXT_ONLY = ImagePolicy()


def _refuse(where: str, why: str) -> RequestRefused:
    return RequestRefused(400, f"{where}: {why}", where)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/<format>;base64,<data>` URL, within `max_bytes` (checked
    before decoding); an `ImageError` saying what is wrong otherwise."""
    head, comma, payload = url.partition(",")
    if not comma or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ImageError(f"a data URL that is not a base64 image (data:image/png;base64,...): {head[:60]!r}")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"a data URL of about {len(payload) * 3 // 4:,} bytes, over the limit of {max_bytes:,}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"a data URL whose base64 does not decode ({exc})") from exc
    if len(data) > max_bytes:
        raise ImageError(f"{len(data):,} bytes, over the limit of {max_bytes:,}")
    return data


def image_of_part(part: dict, policy: ImagePolicy, where: str) -> bytes:
    """One `image_url` part's image as checked encoded bytes; a 400 naming `where` otherwise."""
    spec = part.get(IMAGE_PART)
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str) or not url:
        raise _refuse(where, "expected {url: ...} with a data URL")
    try:
        if url.startswith("data:"):
            data = decode_data_url(url, policy.max_bytes)
        elif url.startswith(("http://", "https://")):
            if policy.urls != "any":
                raise _refuse(
                    where,
                    f"{url[:80]!r}: http(s) image URLs are refused (generation.agent.image_urls: data); send the "
                    "image as a data URL (data:image/png;base64,...), or set generation.agent.image_urls: any",
                )
            data = policy.fetch(url, policy.max_bytes)
        else:
            raise _refuse(where, f"{url[:40]!r}: expected a data URL (data:image/png;base64,...)")
        check_image(data, "the image")
    except ImageError as exc:
        raise _refuse(where, str(exc)) from None
    except OSError as exc:  # a fetch that failed (image_urls: any)
        raise _refuse(where, f"could not fetch the image: {type(exc).__name__}: {exc}") from None
    return data


def _part_images(content: list, policy: ImagePolicy, where: str) -> tuple[bytes, ...]:
    images = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where}.content[{j}]"
        if kind == IMAGE_PART:
            if policy.max_images == 0:
                raise _refuse(at, "this policy is a text-only model: it takes no images")
            images.append(image_of_part(part, policy, f"{at}.image_url"))
        elif kind == "text":
            _check_text(part.get("text"), policy, at)
        elif kind not in ("refusal",):
            raise _refuse(f"{at}.type", f"{kind!r} parts are not served (text and image_url are)")
    return tuple(images)


def _check_text(text, policy: ImagePolicy, where: str) -> None:
    if policy.placeholder and isinstance(text, str) and policy.placeholder in text:
        raise _refuse(
            where, f"the text holds the image placeholder {policy.placeholder!r}; images are sent as image_url parts"
        )


def request_images(messages: Sequence[dict], policy: ImagePolicy) -> list[tuple[bytes, ...]]:
    """Each message's images, in order (one tuple per message), read and checked; refuses a
    request whose images are unreadable, too large, from a refused URL, or more than the engine
    takes (`policy.max_images`)."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        where = f"messages[{i}]"
        if isinstance(content, list):
            out.append(_part_images(content, policy, where))
        else:
            _check_text(content, policy, f"{where}.content")
            out.append(())
    total = sum(len(m) for m in out)
    if total > policy.max_images > 0:
        raise RequestRefused(
            400,
            f"messages: {total} images; the engine takes at most {policy.max_images} a request, the "
            "episode's earlier images included (its limit_mm_per_prompt: data.max_images_per_prompt)",
            "messages",
        )
    return out


def image_key(part: dict) -> str:
    """What identifies an image part (a digest of its URL): two messages differ when their images do."""
    spec = part.get(IMAGE_PART)
    url = spec.get("url", "") if isinstance(spec, dict) else ""
    return hashlib.sha256(str(url).encode()).hexdigest()


def data_url(image: bytes) -> str:
    """Encoded image bytes as a base64 data URL (its format from its header)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(image)) as opened:
        kind = (opened.format or "png").lower()
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


def agent_messages(prompt: Prompt) -> list[dict]:
    """The messages an agent starts from: the prompt's messages (or its text as one user turn),
    each `{type: image}` part an `image_url` part with the prompt's next image as a data URL
    (images the messages do not place go before the first user turn's text)."""
    from rlhf_cluster.data.chat_template import with_images

    messages = [dict(m) for m in prompt.messages] if prompt.messages else [{"role": "user", "content": prompt.text}]
    if not prompt.images:
        return messages
    placed = with_images(messages, len(prompt.images))
    images = iter(prompt.images)
    out = []
    for m in placed:
        if isinstance(m.get("content"), list):
            parts = [
                {"type": IMAGE_PART, IMAGE_PART: {"url": data_url(next(images))}} if p.get("type") == "image" else p
                for p in m["content"]
            ]
            m = {**m, "content": parts}
        out.append(m)
    return out
