"""Fuzz targets: bytes in; each either works or raises InputError (the grounding parser never raises).

Run one under atheris with `python -m tests.fuzz.run TARGET [libFuzzer options] [corpus dirs]`, as
tests/test_fuzz_parsers.py does. The seeds and the inputs that once found bugs are in tests/fuzz/corpus/TARGET.
"""

from __future__ import annotations

import io
import json
import os
from functools import lru_cache
from pathlib import Path

from qwen2vl import grounding
from qwen2vl.inputs.fetch import MediaPolicy
from qwen2vl.inputs.image import VisionSpec, image_patches, load_image
from qwen2vl.inputs.video import VideoReader, frame_range, sample_indices, smart_nframes

# A server's policy: inline data only, and small enough that one input decodes in milliseconds.
POLICY = MediaPolicy.deny_all_but_data(max_image_pixels=4096 * 4096)
SPEC = VisionSpec()
SMALL = {"max_pixels": 64 * 28 * 28}
ASSETS = Path(os.environ.get("QWEN2VL_ASSETS", Path(__file__).resolve().parents[2].parent / "shared" / "assets"))


@lru_cache(maxsize=1)
def processor():
    from qwen2vl import Processor

    return Processor.from_pretrained(ASSETS / "qwen2-vl-2b-instruct", policy=POLICY)


def conversation(data: bytes) -> None:
    """A JSON conversation (or batch) through the whole processor: validation, template, tokens, media."""
    try:
        conv = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return  # not JSON: the server's body parser answers those
    processor()(conv, max_pixels=SMALL["max_pixels"])


def data_uri(data: bytes) -> None:
    """A data URI or raw base64 string, resolved and opened as an image."""
    load_image(data.decode("latin-1"), POLICY)  # (raw base64 too: a long string of its alphabet)


def image(data: bytes) -> None:
    """Image file bytes: opened, decoded, converted to RGB and patchified (small)."""
    image_patches(load_image(data, POLICY), SPEC, **SMALL)


def video(data: bytes) -> None:
    """Video container bytes: indexed, then a few frames sampled and decoded."""
    reader = VideoReader(io.BytesIO(data))
    try:
        info = reader.info
        first, last = frame_range({}, info.total_frames, info.fps)
        n = smart_nframes({"nframes": 2} if info.total_frames < 4 else {"fps": 2.0, "max_frames": 4},
                          last - first + 1, info.fps)
        reader.frames(sample_indices(first, last, n))
    finally:
        reader.close()


def grounding_text(data: bytes) -> None:
    """Model output with boxes and quads; the first bytes choose image sizes. Never raises."""
    sizes = [(1 + data[i] * 7, 1 + data[i + 1] * 5) for i in range(0, min(len(data), 4) - 1, 2)]
    boxes = grounding.parse(data[4:].decode("utf-8", "replace"), sizes or None)
    for box in boxes:
        box.resized((448, 448))


TARGETS = {"conversation": conversation, "data_uri": data_uri, "image": image, "video": video,
           "grounding": grounding_text}
ALLOWED = {"grounding": ()}  # exceptions a target may raise; InputError for the others
