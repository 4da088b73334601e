"""An agent for a vision-language policy, as a user writes it with the `openai` client: it forwards
the prompt's messages (their images as data URLs, as the gateway hands them over), then shows the
model an image of its own in a second user turn and asks again. Its samples carry both images."""

from __future__ import annotations

import base64
import io

from openai import OpenAI
from PIL import Image


def green_square() -> str:
    out = io.BytesIO()
    Image.new("RGB", (28, 28), "green").save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def run(base_url: str, api_key: str, messages: list[dict]) -> None:
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    first = client.chat.completions.create(model="policy", messages=messages, max_tokens=4)
    messages.append({"role": "assistant", "content": first.choices[0].message.content or ""})
    shown = [{"type": "image_url", "image_url": {"url": green_square()}}, {"type": "text", "text": "and this one?"}]
    messages.append({"role": "user", "content": shown})
    client.chat.completions.create(model="policy", messages=messages, max_tokens=4)
