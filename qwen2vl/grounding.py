"""Boxes in Qwen2-VL's answers, as data and as pictures.

Qwen2-VL writes `<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` with
integer coordinates normalized to [0, 1000) of the image, top-left then bottom-right (Qwen2.5-VL writes absolute
pixels of its resized input instead; this module is for Qwen2-VL). Quads are `<|quad_start|>(x,y)x4<|quad_end|>`.

Which image a box is on: the last image of the conversation, unless the text names one ("Picture 2", as written by
`add_vision_id=True`, or "image 2"); the most recent such mention before a box wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from PIL import Image, ImageDraw, ImageFont

_REF = r"<\|object_ref_start\|>(?P<label>.*?)(?:<\|object_ref_end\|>|(?=<\|(?:box|quad)_start\|>)|$)"
_PT = r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)"
_BOX = rf"<\|box_start\|>\s*(?P<box>{_PT}(?:\s*,\s*{_PT})+)\s*(?:<\|box_end\|>)?"
_QUAD = rf"<\|quad_start\|>\s*(?P<quad>{_PT}(?:\s*,\s*{_PT})+)\s*(?:<\|quad_end\|>)?"
_PICTURE = r"\b(?:[Pp]icture|[Ii]mage)\s+(?P<picture>\d+)\b"
_TOKENS = re.compile(f"{_REF}|{_BOX}|{_QUAD}|{_PICTURE}", re.S)
_POINT = re.compile(_PT)
SCALE = 1000  # Qwen2-VL's normalized coordinate range


@dataclass
class Box:
    """A box in pixels of the original image `image` (an index into the image sizes given to `parse`)."""
    label: str | None
    x1: float
    y1: float
    x2: float
    y2: float
    image: int
    normalized: tuple[float, float, float, float] = (0, 0, 0, 0)  # as written, in [0, 1000]
    points: list[tuple[float, float]] = field(default_factory=list)  # a quad's four corners (pixels), else empty

    def resized(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The same box in pixels of another size of the image (e.g. the model's resized input), clamped."""
        return _to_pixels(self.normalized, size)


def parse(text: str, image_sizes: Iterable[tuple[int, int]] | None = None) -> list[Box]:
    """Every box and quad in `text`, in pixels of the original images (width, height). Never raises: malformed parts
    are skipped. Without image sizes, coordinates stay normalized (a 1000 x 1000 image)."""
    sizes = list(image_sizes or []) or [(SCALE, SCALE)]
    boxes: list[Box] = []
    image = len(sizes) - 1
    label, label_end = None, -1
    try:
        matches = list(_TOKENS.finditer(text or ""))
    except (TypeError, re.error):
        return boxes
    for m in matches:
        if m.group("picture") is not None:
            n = int(m.group("picture"))
            if 1 <= n <= len(sizes):
                image = n - 1
            continue
        if m.group("label") is not None and m.group(0).startswith("<|object_ref_start|>"):
            label, label_end = m.group("label").strip(), m.end()
            continue
        # A reference labels the boxes that follow it directly (only space or other boxes in between).
        if label is not None and text[label_end:m.start()].strip():
            label = None
        points = [(float(x), float(y)) for x, y in _POINT.findall(m.group("box") or m.group("quad") or "")]
        label_end = m.end()
        size = sizes[image]
        if m.group("box") is not None:
            for i in range(0, len(points) - 1, 2):  # "(a),(b),(c),(d)" inside one box tag: two boxes
                (ax, ay), (bx, by) = points[i], points[i + 1]
                norm = (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))
                boxes.append(Box(label, *_to_pixels(norm, size), image=image, normalized=norm))
        elif len(points) >= 4:
            xs, ys = [p[0] for p in points[:4]], [p[1] for p in points[:4]]
            norm = (min(xs), min(ys), max(xs), max(ys))
            corners = [_to_pixels((x, y, x, y), size)[:2] for x, y in points[:4]]
            boxes.append(Box(label, *_to_pixels(norm, size), image=image, normalized=norm, points=corners))
    return boxes


def _to_pixels(norm: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    w, h = size
    clamp = lambda v, hi: min(max(v, 0.0), float(hi))
    x1, y1, x2, y2 = norm
    return clamp(x1 / SCALE * w, w), clamp(y1 / SCALE * h, h), clamp(x2 / SCALE * w, w), clamp(y2 / SCALE * h, h)


def prompt(phrase: str) -> str:
    """The referring-expression prompt of Qwen2-VL's grounding data: Find <ref>phrase</ref>."""
    return f"Find <|object_ref_start|>{phrase}<|object_ref_end|>"


# ---------------------------------------------------------------------------------------------------------------
# Drawing

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]


def draw(image: Image.Image, boxes: Iterable[Box], image_index: int | None = None) -> Image.Image:
    """A copy of `image` with the boxes (of `image_index`, default all) drawn: a colored outline with a thin dark
    edge, and the label in white on the box color, readable on light and dark images alike."""
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    try:
        font = ImageFont.load_default(size=max(12, width * 6))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for i, b in enumerate(x for x in boxes if image_index is None or x.image == image_index):
        color = PALETTE[i % len(PALETTE)]
        rect = [round(b.x1), round(b.y1), round(b.x2), round(b.y2)]
        d.rectangle([rect[0] - 1, rect[1] - 1, rect[2] + 1, rect[3] + 1], outline=(0, 0, 0), width=width + 2)
        d.rectangle(rect, outline=color, width=width)
        if b.label:
            tx, ty = rect[0], max(0, rect[1] - font.size - 2 * width)
            box = d.textbbox((tx + width, ty + width // 2), b.label, font=font)
            d.rectangle([box[0] - width, box[1] - width // 2, box[2] + width, box[3] + width // 2], fill=color)
            d.text((tx + width, ty + width // 2), b.label, fill=(255, 255, 255), font=font)
    return out
