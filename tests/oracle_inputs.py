"""The inputs oracle: qwen-vl-utils 0.0.14 (process_vision_info) followed by transformers' Qwen2VLProcessor with its
PIL image backend, as the Qwen2-VL model card does it."""

from __future__ import annotations

import os

os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")  # torchvision 0.29 cannot read video; see README


def hf_processor(path):
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    # The PIL image backend (the original slow processor); videos have only the torch one.
    return Qwen2VLProcessor.from_pretrained(path, image_processor=Qwen2VLImageProcessorPil.from_pretrained(path))


def oracle_inputs(processor, conversations, add_vision_id=False) -> dict:
    from qwen_vl_utils import process_vision_info

    batch = conversations if isinstance(conversations[0], list) else [conversations]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, add_vision_id=add_vision_id)
             for c in batch]
    images, videos = process_vision_info(batch)
    # Frames are already sampled and resized by qwen-vl-utils; Qwen2-VL uses no fps (no time scaling).
    video_kwargs = {"do_sample_frames": False, "cap_pixels_per_frame": False} if videos else {}
    out = processor(text=texts, images=images, videos=videos, padding=True, return_tensors="pt", **video_kwargs)
    return dict(out)
