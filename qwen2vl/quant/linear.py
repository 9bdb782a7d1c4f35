"""Linear layers swapped in at load time: quantized ones (AWQ, GPTQ) and ones whose weights are stored in 16 bits
but computed in the activation dtype. Each quantized layer keeps the checkpoint's tensors until `prepare()` converts
them for the kernel the load plan names (the native q4x16 kernels, torch's int4 CPU kernel, or the reference
dequantize-then-matmul), where that kernel can take this layer's shape."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import scratch
from .formats import awq_unpack, dequantize, gptq_unpack, q4x16_pack


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
    """y = x W^T + b with W group-quantized in a checkpoint format ("awq" or "gptq")."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, bits: int, group_size: int,
                 zero_offset: int = 1, dtype: torch.dtype = torch.float32, bulk_dtype: torch.dtype | None = None):
        super().__init__()
        K, N, G = in_features, out_features, in_features // group_size
        # The matmul dtype for inputs of more than DECODE_ROWS rows: float32 or bfloat16 (weights dequantized), or
        # the q4x16 kernels' int8 (activations rounded per 32) or int16 (per 128); float32 where a layer cannot.
        self.bulk_dtype = bulk_dtype or dtype
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
        self.kernel, self.kernels, self.exact = "reference", None, False
        self.register_buffer("perm", None)
        self.prepared = False

    def unpacked(self):
        """q (N, K) uint8, scales (G, N), zeros (G, N), g_idx (K,)."""
        if self.fmt == "awq":
            return awq_unpack(self.qweight, self.qzeros, self.scales, self.group_size, self.kernels)
        return gptq_unpack(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.group_size,
                           self.zero_offset)

    def dequantize(self) -> torch.Tensor:
        return dequantize(*self.unpacked())

    def prepare(self, kernel: str = "reference", kernels=None) -> None:
        """Convert the checkpoint's tensors, once, after loading, for `kernel` (the load plan's choice: "q4x16" with
        `kernels`, a qwen2vl.kernels.Kernels; "q4x16-float32", the same layout with every matmul dequantized to
        float32; "int4_cpu", torch's kernel on bf16 activations; "reference") where it can take this layer's shape,
        else for the reference."""
        kernel, float32 = kernel.removesuffix("-float32"), kernel.endswith("-float32")
        self.prepared, self.kernels = True, kernels
        q, scales, zeros, g_idx = self.unpacked()
        perm = torch.argsort(g_idx, stable=True)
        grouped = torch.equal(g_idx[perm], torch.arange(self.in_features, device=perm.device) // self.group_size)
        on_cpu = self.qweight.device.type == "cpu" and self.bits == 4 and grouped
        if kernel == "q4x16" and kernels is not None and on_cpu and q4x16_fits(self.group_size, self.out_features,
                                                                              scales):
            self._to_q4x16(q, scales, zeros, perm)
        elif kernel == "int4_cpu" and on_cpu and int4_cpu_fits(self.in_features, self.out_features, self.group_size) \
                and int4pack_layout() is not None and self.out_features % int4pack_layout()[0] == 0:
            # (only whole packing blocks: the prefill path dequantizes from them, as exactly as float32)
            self._to_int4_cpu(q, scales, zeros, perm)
        native_many = {torch.int8: self._q4x16_int8, torch.int16: self._q4x16_int16}
        self.few, self.many = {"q4x16": (self.bulk_matmul if float32 else self._q4x16,
                                         native_many.get(self.bulk_dtype, self.bulk_matmul)),
                               "reference": (self._reference,) * 2,
                               "int4_cpu": (self._int4_cpu, self.bulk_matmul)
                               }[self.kernel]

    def _to_q4x16(self, q, scales, zeros, perm) -> None:
        # The native kernels' own streaming layout (no torch packing kept).
        ordered = not torch.equal(perm, torch.arange(len(perm), device=perm.device))
        self.register_buffer("perm", perm if ordered else None)
        packed, sc, zr = q4x16_pack(q[:, perm] if ordered else q, scales, zeros)
        for name in ("qweight", "qzeros", "g_idx", "scales"):
            if hasattr(self, name):
                delattr(self, name)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", sc)
        self.register_buffer("zeros", zr)
        self.exact, self.kernel = True, "q4x16"

    def _to_int4_cpu(self, q, scales, zeros, perm) -> None:
        # torch's int4 CPU kernel computes W = (q - 8) * s + z per group, with bf16 activations
        # (cpu-notes: fp32 activations take a ~30x slower path): z = (8 - zero) * s.
        ordered = not torch.equal(perm, torch.arange(len(perm), device=perm.device))
        q = q[:, perm] if ordered else q
        self.register_buffer("perm", perm if ordered else None)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2))
        self.register_buffer("scale_zero", torch.stack([scales, (8 - zeros) * scales], -1).to(torch.bfloat16))
        # For large inputs (prefill) the exact path dequantizes from `packed` itself (whole packing blocks), so no
        # second copy is kept: as compact as the file, fp16 scales (exact) and integer zero points.
        exact_fp16 = torch.equal(scales.half().float(), scales)
        self.register_buffer("scales", scales.half() if exact_fp16 else scales.float())
        self.register_buffer("zeros", zeros.to(torch.uint8))
        self.exact = True
        for name in ("qweight", "qzeros", "g_idx"):
            if hasattr(self, name):
                delattr(self, name)  # the checkpoint form is no longer needed
        self.kernel = "int4_cpu"

    @classmethod
    def concat(cls, parts: list["QuantLinear"]) -> "QuantLinear | None":
        """One layer (q4x16 or int4_cpu kernel) computing `parts` (same input) side by side, taking over their
        weights; None if they cannot be fused (other kernels, act-order, packing blocks straddling two parts)."""
        first = parts[0]
        if first.kernel not in ("q4x16", "int4_cpu"):
            return None
        layout = int4pack_layout()
        block = 16 if first.kernel == "q4x16" else layout[0] if layout is not None else 0
        if not block or any(p.kernel != first.kernel or p.perm is not None or not p.exact
                            or p.out_features % block or p.group_size != first.group_size
                            or p.in_features != first.in_features or p.bulk_dtype != first.bulk_dtype
                            or (p.bias is None) != (first.bias is None) for p in parts):
            return None
        with torch.device("meta"):  # its checkpoint-form buffers are never filled
            fused = cls(first.in_features, sum(p.out_features for p in parts), first.bias is not None, first.fmt,
                        first.bits, first.group_size, first.zero_offset, bulk_dtype=first.bulk_dtype)
        for name in ("qweight", "qzeros", "g_idx"):
            if hasattr(fused, name):
                delattr(fused, name)
        fused.register_buffer("perm", None)
        fused.packed = torch.cat([p.packed for p in parts])  # whole packing blocks per part, along N
        if first.kernel == "q4x16":  # (N/16, G, 16)
            fused.scales, fused.zeros = (torch.cat([getattr(p, n) for p in parts]) for n in ("scales", "zeros"))
        else:  # (G, N)
            for name in ("scale_zero", "scales", "zeros"):
                setattr(fused, name, torch.cat([getattr(p, name) for p in parts], dim=1))
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        fused.exact, fused.kernel, fused.prepared, fused.kernels = True, first.kernel, True, first.kernels
        fused.few, fused.many = (getattr(fused, f.__name__) for f in (first.few, first.many))  # the same paths
        for p in parts:  # the parts keep their names (and shapes) but no longer hold weights
            for name in ("packed", "scale_zero", "scales", "zeros"):
                setattr(p, name, None)
            p.kernel = "fused"
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:  # act-order: input features in group order
            x2 = x2[:, self.perm]
        y = (self.many if x2.shape[0] > DECODE_ROWS else self.few)(x2).to(x.dtype)
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))

    def _q4x16(self, x: torch.Tensor) -> torch.Tensor:  # int16-rounded activations (kernels.c)
        return self.kernels.q4x16_gemv(x, self.packed, self.scales, self.zeros)

    def _q4x16_int8(self, x: torch.Tensor) -> torch.Tensor:  # int8 activations per 32 (kernels.c)
        return self.matmul_int8(self.kernels.act_quant_i8(x))

    def _q4x16_int16(self, x: torch.Tensor) -> torch.Tensor:  # int16 activations per 128 (kernels.c), any rows
        return self.matmul_int16(x.float())

    def matmul_int16(self, x: torch.Tensor, glu: bool = False) -> torch.Tensor:
        """x W^T (M, N) float32 for float32 rows rounded to int16 per 128 (a q4x16 layer); with `glu`, x is
        [a | b] (M, 2K) and the rows multiplied are silu(a) * b."""
        return self.kernels.q4x16_gemm_i16(x, self.packed, self.scales, self.zeros, glu=glu)

    def matmul_int8(self, x) -> torch.Tensor:
        """x W^T (M, N) float32 for rows already quantized by Kernels.act_quant_i8 (a q4x16 layer)."""
        return self.kernels.q4x16_gemm_i8(x, self.packed, self.scales, self.zeros)

    def _int4_cpu(self, x: torch.Tensor) -> torch.Tensor:  # bf16 activations
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group_size,
                                                          self.scale_zero)

    def bulk_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) -> x W^T (M, N), no bias, in the matmul's dtype: the weights dequantized (natively where the
        plan gave kernels) into a reused buffer, in `bulk_dtype`, else by torch ops in x's dtype."""
        N, K = self.out_features, self.in_features
        dtype = self.bulk_dtype if self.bulk_dtype.is_floating_point else torch.float32  # int8/16: own kernels
        if self.kernel == "q4x16":  # W^T (K, N): oneDNN's bf16 matmul is ~25% faster with it at ~300 rows
            wt = self.kernels.q4x16_dequant_t(self.packed, self.scales, self.zeros, scratch(K * N, dtype).view(K, N))
            return torch.mm(x.to(wt.dtype), wt)
        B = int4pack_layout()[0]
        if self.kernels is not None:
            wt = self.kernels.q4pack_dequant_t(self.packed, self.scales.float(), self.zeros.float(), N, K, B,
                                               self.group_size, scratch(K * N, dtype).view(K, N))
            return torch.matmul(x.to(wt.dtype), wt)
        rows = max(B, (DEQUANT_BLOCK // K) // B * B)  # output features per block, whole packing blocks
        out = []
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            q = unpack_int4pack(self.packed[n0:n1], n1 - n0, K)  # the packing keeps each block's bytes together
            w = dequantize_grouped(q, self.scales[:, n0:n1], self.zeros[:, n0:n1], self.group_size)
            out.append(F.linear(x, w.to(x.dtype)))
        return torch.cat(out, dim=-1)


DECODE_ROWS = 16  # inputs with at most this many rows use the int4 kernel (cpu-notes: it wins at M=1, not M>=64)
DEQUANT_BLOCK = 1 << 22  # weights dequantized at a time on the exact path (16 MB of float32)


def dequantize_grouped(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """q (N, K) with contiguous groups -> W (N, K) float32 = (q - zero) * scale, in two passes."""
    N, K = q.shape
    w = q.view(N, K // group_size, group_size).to(torch.float32)
    w.sub_(zeros.t().float()[:, :, None]).mul_(scales.t().float()[:, :, None])
    return w.view(N, K)


def q4x16_fits(group_size: int, out_features: int, scales: torch.Tensor) -> bool:
    """Where the q4x16 layout holds a layer exactly: groups of 128, fp16-exact scales (AWQ/GPTQ store fp16)."""
    return (group_size == 128 and out_features % 16 == 0
            and torch.equal(scales.half().float(), scales.float()))


def int4_cpu_fits(in_features: int, out_features: int, group_size: int) -> bool:
    """Where torch's int4 CPU kernel applies (its packing needs out_features % 16 == 0)."""
    return (group_size in (32, 64, 128, 256) and in_features % group_size == 0
            and out_features % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


@functools.lru_cache(maxsize=1)
def int4pack_layout() -> tuple[int, torch.Tensor] | None:
    """How torch's CPU int4 packing (which depends on the CPU: AVX-512, AVX2 or scalar) lays out nibbles, found by
    packing index patterns: (B, perm) such that the packed bytes, read as nibbles (low, high), form (N/B, K, B)
    slots with slot s of a block holding row perm[s]. None if the packing is not of that form."""
    N, K = 128, 64
    pack = lambda v: torch.ops.aten._convert_weight_to_int4pack_for_cpu(v.to(torch.int32).contiguous(), 2)
    nib = lambda p: torch.stack([p & 0xF, p >> 4], -1).flatten().long()
    n = torch.arange(N)[:, None].expand(N, K)
    k = torch.arange(K)[None, :].expand(N, K)
    rows = nib(pack(n % 16)) + 16 * nib(pack(n // 16))
    cols = nib(pack(k % 16)) + 16 * nib(pack(k // 16))
    for B in (64, 32, 16):
        r, c = rows.view(N // B, K, B), cols.view(N // B, K, B)
        perm = r[0, 0] % B
        if torch.equal(c, torch.arange(K)[None, :, None].expand_as(c)) and \
                torch.equal(r, (torch.arange(N // B)[:, None, None] * B + perm).expand_as(r)):
            return B, perm
    return None


def unpack_int4pack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The levels q (N, K) uint8 back from torch's CPU int4 packing."""
    B, perm = int4pack_layout()
    p = packed.view(N // B, K, B // 2)
    if torch.equal(perm, _halves(B)):  # AVX-512 and AVX2: low nibbles rows 0..B/2-1, high nibbles the rest
        q = torch.cat([p & 0xF, p >> 4], dim=-1)
    else:
        q = torch.empty(N // B, K, B, dtype=torch.uint8, device=packed.device)
        q[..., perm] = torch.stack([p & 0xF, p >> 4], -1).view(N // B, K, B)
    return q.transpose(1, 2).reshape(N, K)  # q[i, k, r] = level of row i*B + r at column k


def _halves(B: int) -> torch.Tensor:
    """The slot order [0, B/2, 1, B/2 + 1, ...]: byte j holds rows j (low nibble) and j + B/2 (high nibble)."""
    return torch.stack([torch.arange(B // 2), torch.arange(B // 2) + B // 2], -1).flatten()
