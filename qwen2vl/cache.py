"""The KV cache: keys and values of every decoder layer, preallocated. The text decoder writes into it; generation
owns it; the native decode layer writes its own position in place."""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of every layer, preallocated: (layers, B, Hkv, capacity, D). `length` positions are filled."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(layers, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise RuntimeError(f"KV cache full ({self.k.shape[3]} positions)")
        ks, vs = self.k[layer], self.v[layer]  # narrow/copy_: a few microseconds less than slice assignment
        ks.narrow(2, self.length, k.shape[2]).copy_(k)
        vs.narrow(2, self.length, v.shape[2]).copy_(v)
        return ks.narrow(2, 0, end), vs.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has written its n new positions."""
        self.length += n

    def keep(self, rows: torch.Tensor) -> None:
        self.k, self.v = self.k[:, rows], self.v[:, rows]
