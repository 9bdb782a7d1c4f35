"""Typed hand-offs between pipeline stages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError


@dataclass(frozen=True)
class MediaItem:
    """One image or video of a single prompt: its <|image_pad|>/<|video_pad|> tokens [start, end), its patch rows
    and its grid (t, h, w)."""
    kind: str  # "image" | "video"
    start: int
    end: int
    pixels: torch.Tensor
    grid: torch.Tensor


@dataclass
class ModelInputs:
    """The processor's output, with the same fields and layout as transformers' `Qwen2VLProcessor`.

    input_ids (B, L) int64, left-padded; attention_mask (B, L) 1 = real token; pixel_values (N, C*T*P*P) float32 for
    all images in order of appearance, image_grid_thw (n_images, 3) = (t, h, w) in patches; the same for videos.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    image_sizes: list[list[tuple[int, int]]] | None = None  # original (width, height) of each conversation's images

    TENSORS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
               "video_grid_thw")

    @classmethod
    def of(cls, inputs: Any) -> "ModelInputs":
        """From a ModelInputs, a mapping (e.g. transformers' BatchFeature) or any object with those attributes."""
        if isinstance(inputs, cls):
            return inputs
        get = inputs.get if isinstance(inputs, Mapping) else (lambda k: getattr(inputs, k, None))
        values = {name: get(name) for name in cls.TENSORS}
        if values["input_ids"] is None:
            raise InputError("inputs have no input_ids")
        for name, value in values.items():
            if value is not None and not isinstance(value, torch.Tensor):
                values[name] = torch.as_tensor(value)
        x = cls(**values)
        x.validate()
        return x

    def validate(self) -> None:
        if self.input_ids.dim() == 1:
            self.input_ids = self.input_ids[None]
            if self.attention_mask is not None and self.attention_mask.dim() == 1:
                self.attention_mask = self.attention_mask[None]
        if self.input_ids.dim() != 2:
            raise InputError(f"input_ids must be (batch, length), got shape {tuple(self.input_ids.shape)}")
        if self.attention_mask is not None and self.attention_mask.shape != self.input_ids.shape:
            raise InputError(f"attention_mask shape {tuple(self.attention_mask.shape)} differs from input_ids "
                             f"shape {tuple(self.input_ids.shape)}")
        for px, grid, kind in ((self.pixel_values, self.image_grid_thw, "image"),
                               (self.pixel_values_videos, self.video_grid_thw, "video")):
            if (px is None) != (grid is None):
                raise InputError(f"{kind} pixel values and {kind}_grid_thw must be given together")
            if grid is None:
                continue
            if grid.dim() != 2 or grid.shape[1] != 3:
                raise InputError(f"{kind}_grid_thw must be (n, 3), got shape {tuple(grid.shape)}")
            rows = int(grid.long().prod(-1).sum())
            if px.dim() != 2 or px.shape[0] != rows:
                raise InputError(f"{kind} pixel values have shape {tuple(px.shape)} but {kind}_grid_thw "
                                 f"{grid.tolist()} needs {rows} patch rows")

    # Mapping access, like transformers' BatchFeature: inputs["input_ids"], dict(inputs), **inputs.
    def keys(self) -> list[str]:
        return [name for name in self.TENSORS if getattr(self, name) is not None]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    @classmethod
    def cat(cls, parts: list["ModelInputs"], pad_id: int) -> "ModelInputs":
        """One left-padded batch from several (each possibly a batch itself), images and videos kept in order."""
        L = max(p.input_ids.shape[1] for p in parts)
        ids, masks = [], []
        for p in parts:
            mask = p.attention_mask if p.attention_mask is not None else torch.ones_like(p.input_ids)
            pad = L - p.input_ids.shape[1]
            ids.append(torch.nn.functional.pad(p.input_ids, (pad, 0), value=pad_id))
            masks.append(torch.nn.functional.pad(mask, (pad, 0), value=0))
        out = cls(torch.cat(ids), torch.cat(masks))
        if all(p.image_sizes is not None for p in parts):
            out.image_sizes = [sizes for p in parts for sizes in p.image_sizes]
        for px, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            have = [p for p in parts if getattr(p, grid) is not None]
            if have:
                setattr(out, px, torch.cat([getattr(p, px) for p in have]))
                setattr(out, grid, torch.cat([getattr(p, grid) for p in have]))
        return out

    def rows(self, merge: int, image_token_id: int, video_token_id: int) -> list["ModelInputs"]:
        """The batch as single prompts without padding, each with its own images and videos."""
        mask = self.attention_mask if self.attention_mask is not None else torch.ones_like(self.input_ids)
        taken = {"image": 0, "video": 0}  # grid rows consumed so far
        out = []
        for b in range(self.input_ids.shape[0]):
            ids = self.input_ids[b][mask[b].bool()][None]
            row = ModelInputs(ids, torch.ones_like(ids),
                              image_sizes=[self.image_sizes[b]] if self.image_sizes else None)
            for kind, token, px, grid in (("image", image_token_id, "pixel_values", "image_grid_thw"),
                                          ("video", video_token_id, "pixel_values_videos", "video_grid_thw")):
                g = getattr(self, grid)
                need, first = int((ids == token).sum()), taken[kind]
                while need > 0 and g is not None and taken[kind] < g.shape[0]:
                    need -= int(g[taken[kind]].prod()) // merge**2
                    taken[kind] += 1
                if need != 0:
                    raise InputError(f"prompt {b}: its <|{kind}_pad|> tokens do not match {grid}")
                if taken[kind] > first:
                    rows = g.prod(-1)
                    lo, hi = int(rows[:first].sum()), int(rows[:taken[kind]].sum())
                    setattr(row, px, getattr(self, px)[lo:hi])
                    setattr(row, grid, g[first:taken[kind]])
            out.append(row)
        return out

    def media(self, merge: int, image_token_id: int, video_token_id: int) -> list[MediaItem]:
        """The images and videos of a single prompt with their token ranges, in order of appearance."""
        items = []
        for kind, token, px, grid in (("image", image_token_id, self.pixel_values, self.image_grid_thw),
                                      ("video", video_token_id, self.pixel_values_videos, self.video_grid_thw)):
            if grid is None:
                continue
            where = (self.input_ids[0] == token).nonzero()[:, 0].tolist()
            at, row = 0, 0
            for g in grid:
                n, rows = int(g.prod()) // merge**2, int(g.prod())
                if at + n > len(where):
                    raise InputError(f"input_ids hold too few <|{kind}_pad|> tokens for {kind}_grid_thw")
                items.append(MediaItem(kind, where[at], where[at] + n, px[row:row + rows], g))
                at, row = at + n, row + rows
        return sorted(items, key=lambda m: m.start)

    def to(self, device: torch.device | str) -> "ModelInputs":
        moved = {name: (None if getattr(self, name) is None else getattr(self, name).to(device))
                 for name in self.TENSORS}
        return ModelInputs(**moved, image_sizes=self.image_sizes)
