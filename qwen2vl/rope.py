"""Rotary position embeddings: M-RoPE positions and angles for the text model, 2D axial rotary for the ViT.

Spec sections 5.2 (vision), 6.3 (M-RoPE maths) and 6.4 (position ids). Angles are always computed in float32.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import InputError


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference's x * cos + rotate_half(x) * sin, where rotate_half(x) = [-x2, x1] for x = [x1, x2].

    `sin` comes with its first half negated (see `_signed`), so rotate_half(x) * sin_ref = roll(x, D/2) * sin:
    the same products bit for bit, in four ops instead of six (this runs twice per layer per decoded token) and two
    temporaries. Broadcasts cos/sin over the head axis."""
    return (x * cos).add_(x.roll(x.shape[-1] // 2, -1).mul_(sin))


def _signed(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin (see `apply_rotary`) of angles (..., D/2) duplicated to D (rotate_half layout)."""
    c, s = angles.cos(), angles.sin()
    return torch.cat((c, c), dim=-1), torch.cat((-s, s), dim=-1)


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """1 / theta^(2i/dim) for i < dim/2, computed as transformers does (int64 arange, then float)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


# ---------------------------------------------------------------------------------------------------------------
# Text: M-RoPE


def mrope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, mrope_section: tuple[int, ...],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, L, head_dim) for positions (3, B, L) (rows t, h, w); sin sign-folded for `apply_rotary`.

    Frequency i (of head_dim/2) takes its angle from the t, h or w row by chunks [16 t | 24 h | 24 w] for the 2B/7B/72B
    section [16, 24, 24]; the 64 angles are then duplicated to 128, as in rotate_half layout. Cast to the activation
    dtype at the end.
    """
    freqs = positions[..., None].float() * inv_freq(head_dim, theta, positions.device)  # (3, B, L, head_dim/2)
    angles = torch.cat([f[i] for i, f in enumerate(freqs.split(list(mrope_section), dim=-1))], dim=-1)  # (B, L, D/2)
    cos, sin = _signed(angles)
    return cos.to(dtype), sin.to(dtype)


def get_rope_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   image_grid_thw: torch.Tensor | None, video_grid_thw: torch.Tensor | None, *,
                   image_token_id: int, video_token_id: int, spatial_merge_size: int = 2,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, B, L) and per-sample deltas (B,), original Qwen2-VL rule.

    Over the non-pad tokens of each sample: text tokens count up on all three rows; a vision run of grid (t, H, W)
    gets (cur + ti, cur + hi, cur + wi) over its t x H/2 x W/2 tokens, and text after it resumes at
    cur + max(t, H/2, W/2) (not transformers 5.x's max(H/2, W/2)). Grids are consumed in order of appearance across
    the flattened batch. delta_b = max position + 1 - L, so a token appended at sequence index i has position i + delta.
    Pad positions are filled with 1 (they are masked).
    """
    B, L = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    valid = attention_mask.bool()
    if image_grid_thw is None and video_grid_thw is None:
        pos = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
        positions = pos.unsqueeze(0).expand(3, B, L).clone()
        deltas = positions[0].max(-1).values + 1 - L if L else torch.zeros(B, dtype=torch.long, device=device)
        return positions, deltas

    images = _grids(image_grid_thw)
    videos = _grids(video_grid_thw)
    positions = torch.ones(3, B, L, dtype=torch.long, device=device)
    deltas = torch.zeros(B, dtype=torch.long, device=device)
    for b in range(B):  # once per prompt, not per step: each sample's runs differ
        ids = input_ids[b][valid[b]].tolist()
        pos = _sample_positions(ids, images, videos, image_token_id, video_token_id, spatial_merge_size, b)
        positions[:, b, valid[b]] = pos.to(device)
        deltas[b] = int(pos.max()) + 1 - L if pos.numel() else -L
    for kind, it in (("image", images), ("video", videos)):
        left = sum(1 for _ in it)
        if left:
            raise InputError(f"{left} {kind} grid(s) in {kind}_grid_thw have no <|{kind}_pad|> tokens in input_ids")
    return positions, deltas


def _grids(grid_thw: torch.Tensor | None) -> Iterator[tuple[int, int, int]]:
    return iter([] if grid_thw is None else [tuple(int(v) for v in row) for row in grid_thw.tolist()])


def _sample_positions(ids: list[int], images: Iterator, videos: Iterator, image_token_id: int, video_token_id: int,
                      merge: int, sample: int) -> torch.Tensor:
    """Positions (3, n) of one sample's non-pad tokens; consumes one grid per vision run."""
    chunks, cur, st, n = [], 0, 0, len(ids)
    pads = [i for i, tok in enumerate(ids) if tok == image_token_id or tok == video_token_id]
    k = 0  # index into pads of the next vision token at or after st
    while st < n:
        while k < len(pads) and pads[k] < st:
            k += 1
        ed = pads[k] if k < len(pads) else n
        if ed > st:  # text run
            chunks.append(torch.arange(cur, cur + ed - st).expand(3, -1))
            cur += ed - st
        if ed == n:
            break
        kind, token = ("image", image_token_id) if ids[ed] == image_token_id else ("video", video_token_id)
        grid = next(images if kind == "image" else videos, None)
        if grid is None:
            raise InputError(f"sample {sample}: more <|{kind}_pad|> runs in input_ids than rows in {kind}_grid_thw")
        t, h, w = grid[0], grid[1] // merge, grid[2] // merge
        count = t * h * w
        if ids[ed:ed + count] != [token] * count:
            raise InputError(f"sample {sample}: a {kind} with grid {list(grid)} needs {count} consecutive "
                             f"<|{kind}_pad|> tokens at index {ed}")
        ti = torch.arange(t).view(t, 1, 1).expand(t, h, w).flatten()
        hi = torch.arange(h).view(1, h, 1).expand(t, h, w).flatten()
        wi = torch.arange(w).view(1, 1, w).expand(t, h, w).flatten()
        chunks.append(torch.stack([ti, hi, wi]) + cur)
        cur += max(t, h, w)  # the original rule
        st = ed + count
    return torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Vision: 2D axial rotary


def vision_patch_coords(grid_thw: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """(row, col) of every patch row of pixel_values, (N, 2), for grids (n, 3).

    Patch rows are in merge-window-major order within each temporal slice: the flat index q inside a
    slice is ((bh * W/m + bw) * m + i) * m + j for the patch at row bh*m + i, column bw*m + j.
    """
    grid_thw = grid_thw.long()
    t, h, w = grid_thw.unbind(-1)
    sizes = t * h * w
    item = torch.repeat_interleave(torch.arange(len(sizes), device=grid_thw.device), sizes)
    offsets = torch.cumsum(sizes, 0) - sizes
    q = (torch.arange(int(sizes.sum()), device=grid_thw.device) - offsets[item]) % (h * w)[item]
    window, within = q // (merge * merge), q % (merge * merge)
    windows_per_row = (w // merge)[item]
    rows = (window // windows_per_row) * merge + within // merge
    cols = (window % windows_per_row) * merge + within % merge
    return torch.stack([rows, cols], dim=-1)


def vision_cos_sin(grid_thw: torch.Tensor, head_dim: int, theta: float, merge: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos, sin (N, 1, head_dim): angles [rows * inv | cols * inv] (head_dim/2), duplicated; sin
    sign-folded for `apply_rotary`."""
    coords = vision_patch_coords(grid_thw, merge).float()
    inv = inv_freq(head_dim // 2, theta, grid_thw.device)  # 20 frequencies per axis for head_dim 80
    angles = (coords[:, :, None] * inv).flatten(1)  # (N, 2 * head_dim/4) = [rows*inv | cols*inv]
    cos, sin = _signed(angles)
    return cos[:, None, :], sin[:, None, :]
