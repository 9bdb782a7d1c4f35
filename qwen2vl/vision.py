"""The Qwen2-VL vision encoder: patch embedding, 32 pre-LN ViT blocks with 2D rotary and
block-diagonal attention (one block per image or per 2-frame video slice), and the 2x2 patch merger.

Parameter names follow the checkpoints (`visual.patch_embed.proj`, `visual.blocks.{i}.attn.qkv`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .rope import apply_rotary, vision_cos_sin


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), as the reference, in one buffer (the (N, 5120) activations are the ViT's largest)."""
    return (x * 1.702).sigmoid_().mul_(x)


_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}


@dataclass
class Segments:
    """Block-diagonal attention over consecutive row ranges (one per image or video slice) in one SDPA call.

    Equal lengths (one image, a video's slices, same-size images) are a plain reshape; otherwise rows are gathered
    into a padded (S, Lmax) layout with a key mask, so there is no Python loop over images.
    """
    lengths: list[int]
    index: torch.Tensor | None = None  # (S, Lmax) row index per slot, padded slots point at row 0
    key_mask: torch.Tensor | None = None  # (S, 1, 1, Lmax) True where the slot holds a real row

    @classmethod
    def from_grid(cls, grid_thw: torch.Tensor) -> "Segments":
        t, h, w = grid_thw.long().unbind(-1)
        lengths = torch.repeat_interleave(h * w, t)  # each temporal slice attends only to itself
        segs = cls(lengths.tolist())
        if len(set(segs.lengths)) > 1:
            lmax = int(lengths.max())
            starts = torch.cumsum(lengths, 0) - lengths
            slot = torch.arange(lmax, device=grid_thw.device)
            valid = slot[None, :] < lengths[:, None]
            segs.index = torch.where(valid, starts[:, None] + slot[None, :], 0)
            segs.key_mask = valid[:, None, None, :]
        return segs

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (N, H, D) -> (N, H, D)."""
        N, H, D = q.shape
        if self.index is None:
            S = len(self.lengths)
            q, k, v = (x.view(S, N // S, H, D).transpose(1, 2) for x in (q, k, v))  # (S, H, L, D)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, H, D)
        q, k, v = (x[self.index].transpose(1, 2) for x in (q, k, v))  # (S, H, Lmax, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.key_mask).transpose(1, 2)  # (S, Lmax, H, D)
        return out[self.key_mask[:, 0, 0, :]]  # valid slots in order = rows in order


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A Conv3d whose kernel equals its stride over one patch is a matmul with the flattened kernel:
        # rows are laid out [c][t][py][px], as the kernel is.
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1))  # (N, 1176) -> (N, embed_dim)


def rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v (N, H, D) from qkv (N, 3, H, D), q and k rotated in float32 and back in the compute dtype;
    one at a time (peak memory, large images)."""
    q, k, v = qkv.unbind(1)
    return apply_rotary(q.float(), cos, sin).to(v.dtype), apply_rotary(k.float(), cos, sin).to(v.dtype), v


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rotate = rotate_qk  # the load plan may swap in a native kernel that rotates in place (cpu.vision)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.rotate(self.qkv(x).view(N, 3, self.num_heads, -1), cos, sin)  # 3 x (N, H, D)
        return self.proj(segments.attention(q, k, v).reshape(N, -1))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)  # eps hard-coded in the reference
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg.embed_dim, cfg.num_heads)
        self.mlp = VisionMlp(cfg.embed_dim, cfg.mlp_dim, cfg.hidden_act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm each patch, concatenate each 2x2 window's 4 consecutive rows, project with a GELU MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.window_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.window_dim, self.window_dim), nn.GELU(),
                                 nn.Linear(self.window_dim, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.window_dim))  # (N, E) -> (N/4, 4E) -> (N/4, D)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 1176) for all images/videos of `grid_thw` (n, 3) -> embeddings (N/4, hidden_size)."""
        x = self.patch_embed(pixel_values)
        cos, sin = vision_cos_sin(grid_thw, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.spatial_merge_size)
        segments = Segments.from_grid(grid_thw)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x)
