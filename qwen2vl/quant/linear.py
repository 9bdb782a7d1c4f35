"""Linear layers swapped in at load time: quantized ones (AWQ, GPTQ: the checkpoint's tensors and the reference
dequantize-then-matmul) and ones whose weights are stored in 16 bits but computed in the activation dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import awq_unpack, dequantize, gptq_unpack


class UpcastLinear(nn.Module):
    """A linear layer stored in a 16-bit dtype and computed in the input's dtype (e.g. an fp16 vision tower run in
    fp32 on a CPU: half the memory, the same numbers as fp32 weights holding the fp16 values). Large matrices (an LM
    head) are upcast a block of output rows at a time."""

    CHUNK_ROWS = 8192

    def __init__(self, in_features: int, out_features: int, bias: bool, storage_dtype: torch.dtype,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=storage_dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == x.dtype or w.shape[0] <= 2 * self.CHUNK_ROWS:
            return F.linear(x, w.to(x.dtype), self.bias)
        # One reused buffer for the upcast blocks: no allocation per call (an LM head runs every decode step).
        buf = getattr(self, "_buf", None)
        if buf is None or buf.dtype != x.dtype:
            buf = self._buf = torch.empty(self.CHUNK_ROWS, w.shape[1], dtype=x.dtype, device=w.device)
        y = x.new_empty(*x.shape[:-1], w.shape[0])
        for r0 in range(0, w.shape[0], self.CHUNK_ROWS):
            part = w[r0:r0 + self.CHUNK_ROWS]
            block = buf[:part.shape[0]]
            block.copy_(part)
            torch.matmul(x, block.t(), out=y[..., r0:r0 + part.shape[0]])
        return y + self.bias if self.bias is not None else y


class UpcastEmbedding(nn.Module):
    """An embedding table stored in a 16-bit dtype; the looked-up rows come out in `dtype`."""

    def __init__(self, num: int, dim: int, storage_dtype: torch.dtype, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim, dtype=storage_dtype), requires_grad=False)
        self.dtype = dtype

    def use_rows(self, rows) -> None:
        """Read rows from `rows` (a weights.RowReader) instead of the loaded weight, which is dropped."""
        del self.weight
        self.weight = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.dtype)  # (..., dim), as F.embedding


class QuantLinear(nn.Module):
    """y = x W^T + b with W group-quantized in a checkpoint format ("awq" or "gptq"): the checkpoint's tensors, and
    the reference forward (W dequantized to the input's dtype at every call). The CPU plan swaps in layers that hold
    the levels in a kernel's layout instead (qwen2vl.cpu.linear)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, bits: int, group_size: int,
                 zero_offset: int = 1, dtype: torch.dtype = torch.float32):
        super().__init__()
        K, N, G = in_features, out_features, in_features // group_size
        self.in_features, self.out_features = K, N
        self.fmt, self.bits, self.group_size, self.zero_offset = fmt, bits, group_size, zero_offset
        per = 32 // bits
        if fmt == "awq":
            self.register_buffer("qweight", torch.empty(K, N // per, dtype=torch.int32))
            self.register_buffer("qzeros", torch.empty(G, N // per, dtype=torch.int32))
        else:
            self.register_buffer("qweight", torch.empty(K // per, N, dtype=torch.int32))
            self.register_buffer("qzeros", torch.empty(G, N // per, dtype=torch.int32))
            self.register_buffer("g_idx", torch.empty(K, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(G, N))  # float32 whatever the file holds (fp16 in AWQ)
        self.bias = nn.Parameter(torch.empty(N, dtype=dtype), requires_grad=False) if bias else None

    kernel = "reference"  # the path's name, as the CPU layers name theirs

    def unpacked(self, levels: torch.Tensor | None = None):
        """q (N, K) uint8, scales (G, N), zeros (G, N), g_idx (K,); AWQ's q may be given, already unpacked."""
        if self.fmt == "awq":
            return awq_unpack(self.qweight, self.qzeros, self.scales, self.group_size, levels)
        return gptq_unpack(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size,
                           self.zero_offset)

    def dequantize(self) -> torch.Tensor:
        return dequantize(*self.unpacked())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)


def dequantize_grouped(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """q (N, K) with contiguous groups -> W (N, K) float32 = (q - zero) * scale, in two passes."""
    N, K = q.shape
    w = q.view(N, K // group_size, group_size).to(torch.float32)
    w.sub_(zeros.t().float()[:, :, None]).mul_(scales.t().float()[:, :, None])
    return w.view(N, K)
