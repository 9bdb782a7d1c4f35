"""The inputs oracle: qwen-vl-utils 0.0.14 (process_vision_info) followed by transformers' Qwen2VLProcessor with its
PIL image backend, as the Qwen2-VL model card does it."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from functools import lru_cache


@lru_cache(maxsize=1)
def torchcodec_loads() -> bool:
    """torchcodec (qwen-vl-utils' first-choice video reader) needs FFmpeg's shared libraries (Debian's `ffmpeg`)."""
    if importlib.util.find_spec("torchcodec") is None:
        return False
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads libtorchcodec against FFmpeg)
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def torchcodec_ffmpeg_major() -> int:
    """The major version of the FFmpeg torchcodec runs on (its libavformat 62 is FFmpeg 8)."""
    from torchcodec._core import get_ffmpeg_library_versions

    return {62: 8, 61: 7, 60: 6, 59: 5, 58: 4}.get(get_ffmpeg_library_versions()["libavformat"][0], 0)


@contextmanager
def video_reader(name: str):
    """qwen-vl-utils reads videos with `name` ("torchcodec" or "decord"; torchvision 0.29 cannot read video)."""
    from qwen_vl_utils import vision_process

    saved = vision_process.get_video_reader_backend
    vision_process.get_video_reader_backend = lambda: name
    try:
        yield
    finally:
        vision_process.get_video_reader_backend = saved


def hf_processor(path):
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    # The PIL image backend (the original slow processor); videos have only the torch one.
    return Qwen2VLProcessor.from_pretrained(path, image_processor=Qwen2VLImageProcessorPil.from_pretrained(path))


def oracle_inputs(processor, conversations, add_vision_id=False, reader: str | None = None) -> dict:
    """`reader`: the video reader qwen-vl-utils uses; by default torchcodec where it loads, else decord."""
    from qwen_vl_utils import process_vision_info

    batch = conversations if isinstance(conversations[0], list) else [conversations]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, add_vision_id=add_vision_id)
             for c in batch]
    with video_reader(reader or ("torchcodec" if torchcodec_loads() else "decord")):
        images, videos = process_vision_info(batch)
    # Frames are already sampled and resized by qwen-vl-utils; Qwen2-VL uses no fps (no time scaling).
    video_kwargs = {"do_sample_frames": False, "cap_pixels_per_frame": False} if videos else {}
    out = processor(text=texts, images=images, videos=videos, padding=True, return_tensors="pt", **video_kwargs)
    return dict(out)
