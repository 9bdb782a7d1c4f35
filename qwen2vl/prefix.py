"""The prefix cache: keys and values of prompt blocks, reused by later prompts that begin with the same blocks.

A block is `block_size` tokens. Its key chains the previous block's key, its token ids and, for each image or video
with tokens in the block, that item's full content digest (its processed patch rows and grid, so the processing
options count too). A block is reused only when everything up to its end is equal, images included: two images of
one size differ in their digest, and the positions M-RoPE gives a block follow from what precedes it. LRU by bytes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def content_key(pixels: torch.Tensor, grid: torch.Tensor) -> bytes:
    """The full 32-byte digest of an image's or video's processed patch rows, their dtype and grid."""
    h = hashlib.blake2b(digest_size=32)
    h.update(str(grid.tolist()).encode() + str(pixels.dtype).encode())
    h.update(pixels.detach().cpu().contiguous().view(torch.uint8).numpy())  # zero-copy view of the bytes
    return h.digest()


class PrefixCache:
    def __init__(self, max_bytes: int = 1 << 30, block_size: int = 16):
        self.max_bytes, self.block_size = max_bytes, block_size
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hit_tokens = self.query_tokens = 0  # over all lookups: the hit rate

    def keys(self, ids: list[int], media: list[tuple[int, int, bytes]]) -> list[bytes]:
        """The chained key of every full block of `ids`; media: (start, end, content_key) of each item."""
        out, prev, bs = [], b"", self.block_size
        for i in range(len(ids) // bs):
            h = hashlib.blake2b(prev, digest_size=32)
            h.update(torch.tensor(ids[i * bs:(i + 1) * bs], dtype=torch.int64).numpy().tobytes())
            for start, end, key in media:
                if start < (i + 1) * bs and end > i * bs:
                    h.update(key)
            prev = h.digest()
            out.append(prev)
        return out

    def lookup(self, keys: list[bytes], tokens: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """The longest cached run of leading blocks, at most `tokens` long: (its length, k, v), k and v
        (layers, Hkv, length, D)."""
        n = 0
        while n < min(len(keys), tokens // self.block_size) and keys[n] in self.blocks:
            n += 1
        self.query_tokens += tokens
        self.hit_tokens += n * self.block_size
        if n == 0:
            return 0, None, None
        for key in reversed(keys[:n]):  # leading blocks end most recent: the LRU drops descendants first
            self.blocks.move_to_end(key)
        k, v = zip(*(self.blocks[key] for key in keys[:n]))
        return n * self.block_size, torch.cat(k, dim=2), torch.cat(v, dim=2)

    def store(self, keys: list[bytes], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep blocks from k, v (layers, Hkv, S, D) holding positions [0, S); blocks already held are kept as they
        are."""
        bs = self.block_size
        for i in reversed(range(min(len(keys), k.shape[2] // bs))):
            if keys[i] in self.blocks:
                self.blocks.move_to_end(keys[i])
                continue
            block = (k[:, :, i * bs:(i + 1) * bs].clone(), v[:, :, i * bs:(i + 1) * bs].clone())
            size = 2 * block[0].numel() * block[0].element_size()
            if size > self.max_bytes:
                return
            self.blocks[keys[i]] = block
            self.blocks.move_to_end(keys[i])
            self.bytes += size
        while self.bytes > self.max_bytes:
            _, (ko, vo) = self.blocks.popitem(last=False)
            self.bytes -= ko.numel() * ko.element_size() + vo.numel() * vo.element_size()

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
