"""Keys and values: one pool of fixed blocks, shared by reference (vLLM's PagedAttention design).

- The pool holds, for every decoder layer, the keys and values of `num_blocks` blocks of BLOCK tokens, in a storage
  format: float32 (exact), float16, or uint8 with a scale and a zero point per token and kv head. Compute is float32.
  Within a block, keys are stored transposed (head dim, then tokens) so that attention multiplies one query element
  by BLOCK keys at a time; values token by token.
- A sequence owns a block table: its blocks' ids in order. Blocks are shared by reference: a full block is keyed by
  the chained hash of every token up to its end (images by content), and a later prompt that begins with the same
  blocks reads the same ones. A block nobody references stays cached under its key until its room is needed, least
  recently used first. Joining, growing, finishing and reusing a prefix move block ids, never keys or values.
- Room is reserved when a sequence is admitted (its prompt and its longest answer), so a running sequence never
  runs out of blocks; a sequence that does not fit waits.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 16  # tokens per block

# Storage formats: bytes per value, and the kernels' code for each (kernels.c KV_*).
FORMATS = {"float32": (torch.float32, 0), "float16": (torch.float16, 1), "uint8": (torch.uint8, 2)}


def content_key(pixels: torch.Tensor, grid: torch.Tensor) -> bytes:
    """The full 32-byte digest of an image's or video's processed patch rows, their dtype and grid."""
    h = hashlib.blake2b(digest_size=32)
    h.update(str(grid.tolist()).encode() + str(pixels.dtype).encode())
    h.update(pixels.detach().cpu().contiguous().view(torch.uint8).numpy())  # zero-copy view of the bytes
    return h.digest()


def block_keys(ids: list[int], media: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The chained key of every full block of `ids`: the previous block's key, the block's token ids and, for each
    image or video with tokens in it, that item's content key; media: (start, end, content_key) of each item."""
    out, prev = [], b""
    for i in range(len(ids) // BLOCK):
        h = hashlib.blake2b(prev, digest_size=32)
        h.update(torch.tensor(ids[i * BLOCK:(i + 1) * BLOCK], dtype=torch.int64).numpy().tobytes())
        for start, end, key in media:
            if start < (i + 1) * BLOCK and end > i * BLOCK:
                h.update(key)
        prev = h.digest()
        out.append(prev)
    return out


class PoolFull(RuntimeError):
    """A request needs more blocks than the whole pool holds (it could never run)."""


class KVPool:
    """Keys and values of every layer in blocks: k (layers, kv heads, blocks, head_dim, BLOCK) and v (layers, kv
    heads, blocks, BLOCK, head_dim) in the storage dtype; for uint8, `scales` (2, layers, kv heads, blocks, BLOCK, 2):
    keys' then values' (scale, zero) per token, value = q * scale + zero. A head's blocks are adjacent, so blocks
    taken in order are read as one stream. The tensors are allocated untouched, so memory is taken as blocks are
    first written."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_bytes: int, fmt: str = "float32"):
        if fmt not in FORMATS:
            raise ValueError(f"KV storage {fmt!r}: use one of {', '.join(FORMATS)}")
        self.fmt, (self.dtype, self.code) = fmt, FORMATS[fmt]
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.num_blocks = max(1, max_bytes // self.block_bytes(layers, kv_heads, head_dim, fmt))
        shape = (layers, kv_heads, self.num_blocks)
        self.k = torch.empty(*shape, head_dim, BLOCK, dtype=self.dtype)
        self.v = torch.empty(*shape, BLOCK, head_dim, dtype=self.dtype)
        self.scales = torch.empty(2, *shape, BLOCK, 2) if fmt == "uint8" else None
        self.refs = [0] * self.num_blocks
        self.free = list(range(self.num_blocks))  # a heap: the lowest ids first, so fewer pages are ever touched
        self.key_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # keyed blocks nobody references, least recent first
        self.reserved = 0  # blocks promised to admitted sequences, not yet taken
        self.hit_tokens = self.query_tokens = 0  # over all lookups: the prefix cache's hit rate

    @staticmethod
    def block_bytes(layers: int, kv_heads: int, head_dim: int, fmt: str) -> int:
        per_value = FORMATS[fmt][0].itemsize
        return 2 * layers * kv_heads * BLOCK * (head_dim * per_value + (8 if fmt == "uint8" else 0))

    # -- room

    @property
    def available(self) -> int:
        """Blocks that can still be promised: free or idle, less those already promised."""
        return len(self.free) + len(self.idle) - self.reserved

    def reserve(self, n: int) -> bool:
        """Promise n blocks to a sequence being admitted; False (nothing promised) if they are not there now."""
        if n > self.num_blocks:
            raise PoolFull(f"needs {n} KV blocks of {BLOCK} tokens; the pool holds {self.num_blocks} "
                           f"({self.capacity_bytes / 2**30:.2f} GiB)")
        if n > self.available:
            return False
        self.reserved += n
        return True

    def unreserve(self, n: int) -> None:
        self.reserved -= n

    def take(self) -> int:
        """A fresh block, referenced once, out of a reservation: a free one, else the least recently used idle one
        (its key forgotten)."""
        if self.free:
            b = heapq.heappop(self.free)
        else:
            b, _ = self.idle.popitem(last=False)
            del self.block_of[self.key_of.pop(b)]
        self.refs[b] = 1
        self.reserved -= 1
        return b

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; keyed ones become idle (cached), the others free. Later blocks of a
        sequence are released first, so they are evicted first (a prefix outlives its continuations)."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b]:
                continue
            if b in self.key_of:
                self.idle[b] = None
            else:
                heapq.heappush(self.free, b)

    # -- the prefix cache

    def lookup(self, keys: list[bytes], tokens: int) -> list[int]:
        """The longest run of cached leading blocks, covering at most `tokens` tokens, each referenced once more."""
        found = []
        for key in keys[:tokens // BLOCK]:
            b = self.block_of.get(key)
            if b is None:
                break
            found.append(b)
        self.query_tokens += tokens
        self.hit_tokens += len(found) * BLOCK
        for b in found:
            if self.refs[b] == 0:
                del self.idle[b]
            self.refs[b] += 1
        return found

    def register(self, blocks: list[int], keys: list[bytes]) -> None:
        """Key full blocks (written through their last token) so that later prompts find them. A key already held
        by another block keeps that one; this block stays unkeyed and is freed when released."""
        for b, key in zip(blocks, keys):
            if b not in self.key_of and key not in self.block_of:
                self.key_of[b], self.block_of[key] = key, b

    def clear(self) -> None:
        """Forget every idle block (the prefix cache emptied); blocks in use are untouched."""
        for b in self.idle:
            del self.block_of[self.key_of.pop(b)]
            heapq.heappush(self.free, b)
        self.idle.clear()

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def bytes(self) -> int:
        """Bytes of the blocks holding keys and values: in use, or cached for reuse."""
        return (self.num_blocks - len(self.free)) * self.block_bytes(self.layers, self.kv_heads, self.head_dim,
                                                                      self.fmt)

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks that sequences reference (not merely cached)."""
        return (self.num_blocks - len(self.free) - len(self.idle)) * \
            self.block_bytes(self.layers, self.kv_heads, self.head_dim, self.fmt)

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.block_bytes(self.layers, self.kv_heads, self.head_dim, self.fmt)

    # -- storage

    def pointers(self, layer: int) -> tuple[int, int, int | None, int | None]:
        """Addresses of one layer's keys, values and (uint8) scales, for native kernels (kernels.c kv_pool_t)."""
        k, v = self.k[layer], self.v[layer]
        if self.scales is None:
            return k.data_ptr(), v.data_ptr(), None, None
        return k.data_ptr(), v.data_ptr(), self.scales[0, layer].data_ptr(), self.scales[1, layer].data_ptr()

    def store(self, layer: int, blocks: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys and values k, v (N, Hkv, D) float32 at (block, slot) pairs (N,)."""
        if self.fmt == "uint8":
            k, ks = quantize_u8(k)
            v, vs = quantize_u8(v)
            self.scales[0, layer][:, blocks, slots] = ks.transpose(0, 1)
            self.scales[1, layer][:, blocks, slots] = vs.transpose(0, 1)
        self.k[layer][:, blocks, :, slots] = k.to(self.dtype)  # (N, Hkv, D): split indices index first
        self.v[layer][:, blocks, slots] = v.to(self.dtype).transpose(0, 1)  # (Hkv, N, D) into (Hkv, blocks, BLOCK, D)

    def gather(self, layer: int, blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n keys and values (Hkv, n, D) float32 of a sequence whose block table is `blocks`."""
        k = self.k[layer][:, blocks].transpose(2, 3).reshape(self.kv_heads, -1, self.head_dim)[:, :n].float()
        v = self.v[layer][:, blocks].reshape(self.kv_heads, -1, self.head_dim)[:, :n].float()
        if self.fmt == "uint8":
            ks, vs = (s[layer][:, blocks].reshape(self.kv_heads, -1, 2)[:, :n] for s in self.scales)
            k, v = k * ks[..., :1] + ks[..., 1:], v * vs[..., :1] + vs[..., 1:]
        return k, v


def quantize_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) float32 -> uint8 levels and (scale, zero) (..., 2) per row: x ~ q * scale + zero, zero the row's
    minimum and scale its range / 255 (an error of at most half a step: range / 510)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / 255).clamp(min=1e-30)
    q = ((x - lo) / scale).round_().clamp_(0, 255).to(torch.uint8)
    return q, torch.cat([scale, lo], -1)


@dataclass
class BlockTable:
    """A sequence's blocks, in order, and how many tokens they hold; `reserved` blocks may still be taken."""
    blocks: list[int]
    tokens: int = 0
    reserved: int = 0

    def grow(self, pool: KVPool, tokens: int) -> None:
        """Take blocks (from the reservation) until the table holds room for `tokens` tokens."""
        while len(self.blocks) * BLOCK < tokens:
            if self.reserved <= 0:
                raise RuntimeError("a sequence outgrew its KV reservation")
            self.blocks.append(pool.take())
            self.reserved -= 1

    def free(self, pool: KVPool) -> None:
        pool.release(self.blocks)
        pool.unreserve(self.reserved)
        self.blocks, self.reserved = [], 0


def blocks_for(tokens: int) -> int:
    return math.ceil(tokens / BLOCK)


class KVView:
    """What one forward of B rows reads and writes in the pool: each row's block table (B, T) int32 and how many of
    its keys the pool holds before this forward (B,); the forward's n new tokens of row b go to positions
    starts[b] .. starts[b] + n - 1. Built by generation, passed to the text decoder."""

    def __init__(self, pool: KVPool, tables: torch.Tensor, starts: torch.Tensor, n: int):
        self.pool, self.tables, self.starts, self.n = pool, tables, starts, n
        pos = starts[:, None].long() + torch.arange(n)  # (B, n)
        self.blocks = tables.long().gather(1, pos // BLOCK).flatten()
        self.slots = (pos % BLOCK).flatten()
        self.lengths = (starts + n).to(torch.int32)  # keys each row attends to, its new ones included

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """This forward's keys and values k, v (B, n, Hkv, D) into their slots."""
        B, n, H, D = k.shape
        self.pool.store(layer, self.blocks, self.slots, k.reshape(B * n, H, D).float(), v.reshape(B * n, H, D).float())


def attend(q: torch.Tensor, view: KVView, layer: int) -> torch.Tensor:
    """Softmax attention of q (B, n, H, D) float32 over each row's keys in the pool, causal among the n new ones
    -> (B, n, H * D). The reference: each row's keys gathered (dequantized to float32), then SDPA."""
    B, n, H, D = q.shape
    out = torch.empty(B, n, H * D, dtype=q.dtype)
    for b in range(B):  # rows differ in length; this reference path is not the fast one (kernels: attention_paged)
        S = int(view.lengths[b])
        k, v = view.pool.gather(layer, view.tables[b, :blocks_for(S)].long(), S)  # (Hkv, S, D)
        mask = torch.arange(S)[None, :] <= torch.arange(S - n, S)[:, None]  # (n, S): causal over the new rows
        o = F.scaled_dot_product_attention(q[b].transpose(0, 1), k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           enable_gqa=H != k.shape[0])
        out[b] = o.transpose(0, 1).reshape(n, H * D)
    return out
