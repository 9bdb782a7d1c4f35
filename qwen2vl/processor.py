"""Conversations -> model inputs, identical to qwen-vl-utils 0.0.14 + transformers' Qwen2VLProcessor (PIL backend).

    processor = Processor.from_pretrained(path)
    inputs = processor(conversation_or_batch, max_pixels=512 * 28 * 28)  # ModelInputs
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .chat import ChatTemplate, Tokenizer
from .datatypes import ModelInputs
from .errors import InputError
from .inputs.fetch import MediaPolicy
from .inputs.image import VisionSpec, image_patches, load_image, smart_resize
from .inputs.messages import IMAGE_OPTIONS, VIDEO_OPTIONS, VisionItem, as_batch, checked_options, vision_items
from .inputs.video import frames_from_images, read_video, video_patches

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
log = logging.getLogger("qwen2vl")


class Processor:
    """Chat template + tokenizer + image/video preprocessing of one checkpoint.

    Option defaults (min_pixels, max_pixels, fps, nframes, ...) can be set here, per call, or per item; the item wins,
    then the call, then the processor.
    """

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, spec: VisionSpec,
                 policy: MediaPolicy | None = None, image_budget: int | None = None,
                 video_budget: int | None = None, **defaults: Any):
        self.tokenizer = tokenizer
        # max_pixels for images that set no size (no max_pixels or resized_* in the item, call or defaults); an
        # image it downscales gets a one-line notice. Qwen2VL sets a CPU budget (see loader.CPU_IMAGE_BUDGET).
        self.image_budget = image_budget
        # Visual tokens for a video file that sets no size (frames or pixels), likewise (loader.CPU_VIDEO_BUDGET).
        self.video_budget = video_budget
        self.template = template
        self.spec = spec
        self.policy = policy or MediaPolicy()
        self.defaults = _check_options(defaults)
        self.image_pad_id = tokenizer.token_id(IMAGE_PAD)
        self.video_pad_id = tokenizer.token_id(VIDEO_PAD)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, policy: MediaPolicy | None = None, image_budget: int | None = None,
                        video_budget: int | None = None, **defaults: Any) -> "Processor":
        path = Path(path)
        pre = path / "preprocessor_config.json"
        spec = VisionSpec.from_dict(json.loads(pre.read_text())) if pre.exists() else VisionSpec()
        return cls(Tokenizer.from_pretrained(path), ChatTemplate.from_pretrained(path), spec, policy, image_budget,
                   video_budget, **defaults)

    def with_policy(self, policy: MediaPolicy) -> "Processor":
        """The same processor with another media policy (a server's: where request media may come from)."""
        return Processor(self.tokenizer, self.template, self.spec, policy, self.image_budget, self.video_budget,
                         **self.defaults)

    def __call__(self, conversations: Any, *, add_generation_prompt: bool = True, add_vision_id: bool = False,
                 progress: bool = False, **options: Any) -> ModelInputs:
        batch = as_batch(conversations)
        items = vision_items(batch)
        defaults = {**self.defaults, **_check_options(options)}
        texts = [self.template.render(c, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
                 for c in batch]
        images, videos = [], []
        sizes: list[list[tuple[int, int]]] = [[] for _ in batch]  # original image sizes, for grounding
        for item in items:
            if item.kind == "image":
                patches, grid, size = self._pixels(item, defaults, progress)
                images.append((patches, grid))
                sizes[item.conversation].append(size)
            else:
                videos.append(self._pixels(item, defaults, progress)[:2])
        ids = self._expand(self.tokenizer.encode_batch(texts), images, videos)
        out = self._pad(ids, images, videos)
        out.image_sizes = sizes
        return out

    def _pixels(self, item: VisionItem, defaults: dict, progress: bool):
        """(pixel rows, grid, original (width, height) for images / None for videos)."""
        options = {**{k: v for k, v in defaults.items() if item.kind == "video" or k in IMAGE_OPTIONS}, **item.options}
        try:
            if item.kind == "image":
                image = load_image(item.source, self.policy)
                sized = {"max_pixels", "resized_height", "resized_width"} & options.keys()
                if self.image_budget is None or sized:
                    return (*image_patches(image, self.spec, **options), image.size)
                patches, grid = image_patches(image, self.spec, **options, max_pixels=self.image_budget)
                full = smart_resize(image.height, image.width, self.spec.factor, options.get("min_pixels"))
                if full[0] * full[1] > grid[1] * grid[2] * self.spec.patch_size**2:
                    log.warning(f"qwen2vl: {item.where}: image {image.width}x{image.height} downscaled to "
                                f"{grid[2] * self.spec.patch_size}x{grid[1] * self.spec.patch_size} by the default "
                                f"image budget ({self.image_budget} pixels); pass max_pixels to change it")
                return patches, grid, image.size
            if isinstance(item.source, (list, tuple)):
                frames = frames_from_images(list(item.source), options, self.spec, self.policy)
            elif isinstance(item.source, (str, Path)):
                array, options, notice = read_video(str(item.source), options, self.policy, _bar(progress, item),
                                                    self.video_budget, self.spec)
                if notice:
                    log.warning(f"qwen2vl: {item.where}: {notice}")
                frames = torch.from_numpy(array).permute(0, 3, 1, 2)
            elif isinstance(item.source, torch.Tensor) and item.source.dim() == 4:
                frames = item.source  # already sampled frames (T, C, H, W) uint8
            else:
                raise InputError(f"unsupported video source of type {type(item.source).__name__} "
                                 "(use a path, URL or a list of frames)")
            return (*video_patches(frames, options, self.spec), None)
        except InputError as e:
            raise InputError(f"{item.where} ({item.kind} {item.describe()}): {e}") from None

    def _expand(self, ids: list[list[int]], images: list, videos: list) -> list[list[int]]:
        """Replace the i-th <|image_pad|> (<|video_pad|>) of the batch by t*h*w/4 copies of itself."""
        merge = self.spec.merge_size**2
        counts = {self.image_pad_id: iter([t * h * w // merge for _, (t, h, w) in images]),
                  self.video_pad_id: iter([t * h * w // merge for _, (t, h, w) in videos])}
        out = []
        for row in ids:
            expanded = []
            for tok in row:
                n = next(counts[tok], None) if tok in counts else 1
                if n is None:
                    raise InputError("the prompt has more <|image_pad|>/<|video_pad|> tokens than images/videos "
                                     "(do not write these tokens in message text)")
                expanded.extend([tok] * n)
            out.append(expanded)
        if any(next(it, None) is not None for it in counts.values()):
            raise InputError("the chat template placed fewer vision placeholders than there are images/videos")
        return out

    def _pad(self, ids: list[list[int]], images: list, videos: list) -> ModelInputs:
        L = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), L), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), L), dtype=torch.long)
        for b, row in enumerate(ids):  # left padding
            input_ids[b, L - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[b, L - len(row):] = 1
        x = ModelInputs(input_ids, attention_mask)
        if images:
            x.pixel_values = torch.cat([p for p, _ in images])
            x.image_grid_thw = torch.tensor([g for _, g in images], dtype=torch.long)
        if videos:
            x.pixel_values_videos = torch.cat([p for p, _ in videos])
            x.video_grid_thw = torch.tensor([g for _, g in videos], dtype=torch.long)
        return x


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - VIDEO_OPTIONS
    if unknown:
        raise TypeError(f"unknown processor option(s) {sorted(unknown)}; known: {sorted(VIDEO_OPTIONS)}")
    return checked_options(options)


def _bar(enabled: bool, item: VisionItem):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"decoding video ({item.where})", unit="frame", leave=False)
    return bar.update
