"""Qwen2-VL wiring: vision encoder -> visual embeddings scattered into the token embeddings -> text decoder -> LM head.

Module names match the checkpoints' tensor names: `visual.*`, `model.*` (the text decoder), `lm_head`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import Qwen2VLConfig
from .datatypes import MediaItem, ModelInputs
from .errors import InputError
from .rope import get_rope_index, mrope_cos_sin
from .kv import KVView
from .text import TextModel, attention_mask
from .vision import VisionTransformer


class Qwen2VLModel(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (weights may be stored otherwise: quantized or 16-bit; norms are always this)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(N, 1176) patch rows of images or video slices -> (N/4, D) embeddings, in grid order. The tower runs in
        pieces of at most VISION_PIECE patches (whole temporal slices, which attend only within themselves), so its
        activations stay bounded for a long video."""
        pieces = vision_pieces(grid_thw, VISION_PIECE)
        rows = [int(g.prod(-1).sum()) for g in pieces]
        out = []
        for i, (px, g) in enumerate(zip(pixel_values.split(rows), pieces)):
            self.visual.piece = (i, len(pieces))  # for progress displays (forward hooks on the tower)
            out.append(self.visual(px, g))
        return out[0] if len(out) == 1 else torch.cat(out)

    def positions(self, x: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE position ids (3, B, L) and per-sample decode deltas (B,)."""
        return get_rope_index(x.input_ids, x.attention_mask, x.image_grid_thw, x.video_grid_thw,
                              image_token_id=self.cfg.image_token_id, video_token_id=self.cfg.video_token_id,
                              spatial_merge_size=self.cfg.vision.spatial_merge_size)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              video_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, L, D) with <|image_pad|>/<|video_pad|> rows replaced, in order, by visual embeddings."""
        embeds = self.model.embed_tokens(input_ids)
        for kind, token, visual in (("image", self.cfg.image_token_id, image_embeds),
                                    ("video", self.cfg.video_token_id, video_embeds)):
            slots = input_ids == token
            n = int(slots.sum())
            have = 0 if visual is None else visual.shape[0]
            if n != have:
                raise InputError(f"input_ids hold {n} <|{kind}_pad|> tokens but the {kind}s give {have} embeddings")
            if n:
                embeds = embeds.masked_scatter(slots[..., None], visual.to(embeds.dtype))  # batch-major order
        return embeds

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor | None = None,
                cache: KVView | None = None) -> torch.Tensor:
        """embeds (B, L, D), positions (3, B, L) -> hidden (B, L, D). Either key_valid (B, L) marks the real
        (non-pad) tokens of whole prompts, or `cache` gives each row's keys so far in the KV pool."""
        t = self.cfg.text
        cos, sin = mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, embeds.dtype)
        mask = attention_mask(key_valid, embeds.shape[1]) if cache is None else None
        return self.model(embeds, cos, sin, mask, cache)

    def prompt_embeddings(self, x: ModelInputs,
                          encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Embeddings of a whole prompt. All images and videos go through `encode` (default: the vision encoder) in
        one call, images first; generation passes an encoder with a cache in front."""
        image_embeds = video_embeds = None
        grids = [g for g in (x.image_grid_thw, x.video_grid_thw) if g is not None]
        if grids:
            pixels = torch.cat([p for p in (x.pixel_values, x.pixel_values_videos) if p is not None])
            visual = (encode or self.encode_vision)(pixels, torch.cat(grids))
            n_image = 0 if x.image_grid_thw is None else \
                int(x.image_grid_thw.prod(-1).sum()) // self.cfg.vision.spatial_merge_size**2
            if x.image_grid_thw is not None:
                image_embeds = visual[:n_image]
            if x.video_grid_thw is not None:
                video_embeds = visual[n_image:]
        return self.embed(x.input_ids, image_embeds, video_embeds)

    def visual_embeddings(self, items: list[MediaItem], start: int,
                          encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                          ) -> list[tuple[MediaItem, torch.Tensor]]:
        """Each image or video (x.media) with tokens from `start` on (the ones before are cached) and its
        embeddings (end - start, D): one call of `encode` (default: the vision encoder) for all of them."""
        need = [m for m in items if m.end > start]
        if not need:
            return []
        pixels, grids = torch.cat([m.pixels for m in need]), torch.stack([m.grid for m in need])
        visual = (encode or self.encode_vision)(pixels, grids)
        return list(zip(need, torch.split(visual, [m.end - m.start for m in need])))

    def embed_range(self, input_ids: torch.Tensor, lo: int, hi: int,
                    visual: list[tuple[MediaItem, torch.Tensor]]) -> torch.Tensor:
        """Embeddings (1, hi - lo, D) of one prompt's positions [lo, hi): its tokens' with the visual embeddings
        (from visual_embeddings) written over their placeholders."""
        embeds = self.model.embed_tokens(input_ids[:, lo:hi])
        for m, emb in visual:
            a, b = max(m.start, lo), min(m.end, hi)
            if a < b:
                embeds[0, a - lo:b - lo] = emb[a - m.start:b - m.start].to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def logits(self, x: ModelInputs) -> torch.Tensor:
        """float32 logits (B, L, vocab) for every position of the prompt."""
        x = x.to(self.device)
        if x.attention_mask is None:
            x.attention_mask = torch.ones_like(x.input_ids)
        positions, _ = self.positions(x)
        hidden = self(self.prompt_embeddings(x), positions, x.attention_mask.bool())
        return self.lm_head(hidden).float()


VISION_PIECE = 8192  # patches per vision tower call: its MLP holds 8192 x 5120 float32 (~170 MB) at a time


def vision_pieces(grid_thw: torch.Tensor, limit: int) -> list[torch.Tensor]:
    """grid_thw (n, 3) split into consecutive pieces of at most `limit` patches: whole items, or runs of an item's
    temporal slices (one slice, if larger than `limit`, is a piece of its own)."""
    pieces, current, size = [], [], 0
    for t, h, w in grid_thw.tolist():
        per = h * w
        while t:
            if size and size + per > limit:  # not even one slice fits beside the piece so far: close it
                pieces.append(current)
                current, size = [], 0
            n = max(1, min(t, (limit - size) // per))
            current.append([n, h, w])
            size, t = size + n * per, t - n
    if current:
        pieces.append(current)
    return [torch.tensor(p, dtype=grid_thw.dtype, device=grid_thw.device) for p in pieces]
