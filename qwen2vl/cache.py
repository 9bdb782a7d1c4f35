"""The KV cache: keys and values of every decoder layer, preallocated. The text decoder writes into it; generation
owns it; the native decode layer writes its own position in place."""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of every layer, preallocated: (layers, B, Hkv, capacity, D). `length` positions are filled."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(layers, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)  # zeros: masked padding must not hold NaN (0 * NaN in attention)
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

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def keep(self, rows: torch.Tensor, first: int = 0) -> None:
        """Keep these batch rows, and positions from `first` on."""
        self.k = self.k[:, rows, :, first:].contiguous()
        self.v = self.v[:, rows, :, first:].contiguous()
        self.length -= first

    @classmethod
    def stack(cls, parts: list["KVCache"], room: int) -> "KVCache":
        """The parts' rows in one cache, each part right-aligned at the longest part's length (left padding), with
        `room` free positions after it."""
        S = max(p.length for p in parts)
        L, _, H, _, D = parts[0].k.shape
        out = cls(L, sum(p.k.shape[1] for p in parts), H, D, S + room, parts[0].k.dtype, parts[0].k.device)
        b = 0
        for p in parts:
            n = p.k.shape[1]
            out.k[:, b:b + n, :, S - p.length:S] = p.k[:, :, :, :p.length]
            out.v[:, b:b + n, :, S - p.length:S] = p.v[:, :, :, :p.length]
            b += n
        out.length = S
        return out
