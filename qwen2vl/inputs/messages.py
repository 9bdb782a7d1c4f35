"""Conversations in the qwen-vl-utils message format, validated, with their vision items in order of appearance.

A conversation is a list of {"role": ..., "content": str | list of items}; an item is {"type": "text", "text": ...},
{"type": "image", "image": source, **options}, {"type": "video", "video": source | [frames], **options}, or OpenAI's
{"type": "image_url", "image_url": {"url": ...}}. The kind rules are the chat template's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

IMAGE_OPTIONS = {"min_pixels", "max_pixels", "resized_height", "resized_width"}
VIDEO_OPTIONS = IMAGE_OPTIONS | {"fps", "nframes", "min_frames", "max_frames", "total_pixels", "video_start",
                                 "video_end"}


@dataclass
class VisionItem:
    kind: str  # "image" or "video"
    source: Any  # a path/URL/data URI string, PIL image, array, or (videos) a list of frames
    options: dict[str, Any]
    where: str  # "conversation 0, message 1, item 2", for error messages
    conversation: int = 0

    def describe(self) -> str:
        s = self.source
        if isinstance(s, str):
            return repr(s if len(s) <= 80 else f"{s[:60]}...({len(s)} chars)")
        if isinstance(s, (list, tuple)):
            return f"list of {len(s)} frames"
        return type(s).__name__


def as_batch(conversations: Any) -> list[list[dict]]:
    """One conversation (a list of messages) or a batch of them -> a batch."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise InputError("expected a conversation (a non-empty list of messages) or a list of conversations")
    if isinstance(conversations[0], dict):
        return [list(conversations)]
    for i, c in enumerate(conversations):
        if not isinstance(c, (list, tuple)) or not c:
            raise InputError(f"conversation {i}: expected a non-empty list of messages, got {type(c).__name__}")
    return [list(c) for c in conversations]


def item_kind(item: dict) -> str:
    """As the chat template decides: image, then video, then text."""
    t = item.get("type")
    if t == "image" or "image" in item or "image_url" in item:
        return "image"
    if t == "video" or "video" in item:
        return "video"
    if "text" in item:
        return "text"
    raise InputError(f"unknown content type {t!r} (expected text, image, image_url or video)")


def vision_items(batch: list[list[dict]]) -> list[VisionItem]:
    """Validate every message and return the images and videos in order of appearance across the batch."""
    items = []
    for ci, conversation in enumerate(batch):
        for mi, message in enumerate(conversation):
            where = f"conversation {ci}, message {mi}"
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InputError(f"{where}: a message must be a dict with a 'role' string")
            content = message.get("content")
            if isinstance(content, str):
                continue
            if not isinstance(content, (list, tuple)):
                raise InputError(f"{where}: 'content' must be a string or a list of items")
            for ii, item in enumerate(content):
                at = f"{where}, item {ii}"
                if not isinstance(item, dict):
                    raise InputError(f"{at}: an item must be a dict, got {type(item).__name__}")
                try:
                    kind = item_kind(item)
                except InputError as e:
                    raise InputError(f"{at}: {e}") from None
                if kind == "text":
                    if not isinstance(item["text"], str):
                        raise InputError(f"{at}: 'text' must be a string")
                    continue
                items.append(VisionItem(kind, _source(item, kind, at), _options(item, kind, at), at, ci))
    return items


def _source(item: dict, kind: str, at: str) -> Any:
    if kind == "video":
        if "video" not in item:
            raise InputError(f"{at}: a video item needs a 'video' field")
        return item["video"]
    source = item.get("image", item.get("image_url"))
    if isinstance(source, dict):  # OpenAI: {"image_url": {"url": ...}}
        source = source.get("url")
    if source is None:
        raise InputError(f"{at}: an image item needs an 'image' (or 'image_url') field")
    return source


def _options(item: dict, kind: str, at: str) -> dict[str, Any]:
    allowed = IMAGE_OPTIONS if kind == "image" else VIDEO_OPTIONS
    try:
        return checked_options({k: v for k, v in item.items() if k in allowed})
    except InputError as e:
        raise InputError(f"{at}: {e}") from None


def checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """Vision options without the None ones; each must be a finite number >= 0."""
    for name, value in options.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise InputError(f"option {name} must be a finite number >= 0, got {_short(value)}")
    return {k: v for k, v in options.items() if v is not None}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
