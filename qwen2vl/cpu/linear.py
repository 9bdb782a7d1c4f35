"""Quantized linears as the CPU plan runs them, swapped in for the checkpoint's QuantLinear as each is loaded: the
int4 levels converted once into a kernel's layout, with one path for few rows (decode) and one for many (prefill).

- Q4x16Linear: the native kernels' q4x16 layout (kernels.c). Few rows: activations rounded to int16 per 128 inputs
  (q4x16_gemv), or, `exact`, the weights dequantized to float32. Many rows, by the plan's prefill dtype: weights
  dequantized into a reused buffer (float32 or bf16) and torch's matmul, or the native int8 / int16 activation
  kernels.
- Int4PackLinear: torch's int4 CPU kernel (bf16 activations) for few rows; many rows dequantize its packing (whole
  packing blocks only) to float32.
A layer neither can hold (8-bit, groups other than these, odd shapes) stays a QuantLinear (dequantize, then
torch's matmul).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import scratch
from ..quant.formats import AWQ_ORDER, q4x16_pack
from ..quant.linear import QuantLinear, dequantize_grouped

DECODE_ROWS = 16  # inputs with at most this many rows take the few-rows path (the int4 kernels win at M=1, not M>=64)
DEQUANT_BLOCK = 1 << 22  # weights dequantized at a time without native kernels (16 MB of float32)


class Int4Linear(nn.Module):
    """y = x W^T + b for W held by a subclass in a kernel's layout: act-order inputs permuted into group order, then
    `few` (at most DECODE_ROWS rows) or `many`."""

    kernel = ""  # the path's name, for the plan's reports and the tests

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, perm: torch.Tensor | None,
                 bulk: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.bulk = in_features, out_features, bulk
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.register_buffer("perm", perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:  # act-order: input features in group order
            x2 = x2[:, self.perm]
        y = (self.many if x2.shape[0] > DECODE_ROWS else self.few)(x2).to(x.dtype)
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Q4x16Linear(Int4Linear):
    kernel = "q4x16"

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None, perm: torch.Tensor | None, kernels, bulk: torch.dtype, exact: bool):
        super().__init__(in_features, packed.shape[0] * 16, bias, perm, bulk)
        self.register_buffer("packed", packed)  # (N/16, K/128, 32, 16, 2) uint8
        self.register_buffer("scales", scales)  # (N/16, K/128, 16) fp16
        self.register_buffer("zeros", zeros)  # (N/16, K/128, 16) uint8
        self.kernels, self.exact = kernels, exact
        self.few = self.dequant_matmul if exact else self.gemv
        self.many = {torch.int8: self.int8, torch.int16: self.int16}.get(bulk, self.dequant_matmul)

    def gemv(self, x: torch.Tensor) -> torch.Tensor:  # activations rounded to int16 per 128 (kernels.c)
        return self.kernels.q4x16_gemv(x, self.packed, self.scales, self.zeros)

    def int8(self, x: torch.Tensor) -> torch.Tensor:  # activations in int8 per 32 (kernels.c)
        return self.matmul_int8(self.kernels.act_quant_i8(x))

    def int16(self, x: torch.Tensor) -> torch.Tensor:  # activations in int16 per 128, any number of rows
        return self.matmul_int16(x.float())

    def matmul_int16(self, x: torch.Tensor, glu: bool = False) -> torch.Tensor:
        """x W^T (M, N) float32 for float32 rows rounded to int16 per 128; with `glu`, x is [a | b] (M, 2K) and the
        rows multiplied are silu(a) * b."""
        return self.kernels.q4x16_gemm_i16(x, self.packed, self.scales, self.zeros, glu=glu)

    def matmul_int8(self, x) -> torch.Tensor:
        """x W^T (M, N) float32 for rows already quantized by Kernels.act_quant_i8."""
        return self.kernels.q4x16_gemm_i8(x, self.packed, self.scales, self.zeros)

    def dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T with W^T (K, N) dequantized into a reused buffer in the prefill's float dtype (float32 where that
        is int8 or int16): oneDNN's bf16 matmul is ~25% faster on W^T at ~300 rows."""
        N, K = self.out_features, self.in_features
        dtype = self.bulk if self.bulk.is_floating_point else torch.float32
        wt = self.kernels.q4x16_dequant_t(self.packed, self.scales, self.zeros, scratch(K * N, dtype).view(K, N))
        return torch.mm(x.to(wt.dtype), wt)


class Int4PackLinear(Int4Linear):
    kernel = "int4_cpu"

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                 group_size: int, bias: torch.Tensor | None, perm: torch.Tensor | None, kernels):
        super().__init__(in_features, scales.shape[1], bias, perm, torch.float32)
        self.group_size, self.kernels = group_size, kernels
        self.register_buffer("packed", packed)  # torch's CPU int4 packing, whole blocks of int4pack_layout()[0] rows
        # torch's kernel computes W = (q - 8) * s + z per group, with bf16 activations: z = (8 - zero) * s.
        self.register_buffer("scale_zero", torch.stack([scales, (8 - zeros) * scales], -1).to(torch.bfloat16))
        exact_fp16 = torch.equal(scales.half().float(), scales)  # as compact as the file
        self.register_buffer("scales", scales.half() if exact_fp16 else scales.float())
        self.register_buffer("zeros", zeros.to(torch.uint8))
        self.few, self.many = self.int4_mm, self.dequant_matmul

    def int4_mm(self, x: torch.Tensor) -> torch.Tensor:  # bf16 activations (its float32 path is ~30x slower)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group_size,
                                                          self.scale_zero)

    def dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in float32 from the packing itself (natively where the plan gave kernels), no second copy."""
        N, K = self.out_features, self.in_features
        B = int4pack_layout()[0]
        if self.kernels is not None:
            wt = self.kernels.q4pack_dequant_t(self.packed, self.scales.float(), self.zeros.float(), N, K, B,
                                               self.group_size, scratch(K * N, torch.float32).view(K, N))
            return torch.matmul(x.float(), wt)
        rows = max(B, (DEQUANT_BLOCK // K) // B * B)  # output features per block, whole packing blocks
        out = []
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            q = unpack_int4pack(self.packed[n0:n1], n1 - n0, K)  # the packing keeps each block's bytes together
            w = dequantize_grouped(q, self.scales[:, n0:n1], self.zeros[:, n0:n1], self.group_size)
            out.append(F.linear(x.float(), w))
        return torch.cat(out, dim=-1)


def convert(layer: QuantLinear, kernel: str, kernels, bulk: torch.dtype) -> nn.Module:
    """The layer to run in place of a loaded QuantLinear: `kernel` ("q4x16", "q4x16-float32": the same layout with
    every matmul dequantized to float32, "int4_cpu", "reference") where it can hold this layer, else the layer."""
    if kernel == "reference" or layer.bits != 4 or layer.qweight.device.type != "cpu":
        return layer
    native = kernels is not None and layer.fmt == "awq"  # the same levels as torch ops unpack, ~30x faster
    q, scales, zeros, g_idx = layer.unpacked(kernels.awq_unpack_t(layer.qweight, AWQ_ORDER) if native else None)
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(layer.in_features) // layer.group_size):
        return layer  # groups of unequal sizes: no kernel's layout
    ordered = not torch.equal(perm, torch.arange(len(perm)))
    q, perm = (q[:, perm], perm) if ordered else (q, None)
    bias = None if layer.bias is None else layer.bias.data
    if kernel.startswith("q4x16") and kernels is not None and q4x16_fits(layer.group_size, layer.out_features,
                                                                         scales):
        return Q4x16Linear(*q4x16_pack(q, scales, zeros), layer.in_features, bias, perm, kernels, bulk,
                           exact=kernel.endswith("-float32"))
    if kernel == "int4_cpu" and int4_cpu_fits(layer.in_features, layer.out_features, layer.group_size):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        return Int4PackLinear(packed, scales, zeros, layer.in_features, layer.group_size, bias, perm, kernels)
    return layer


def fuse(model: nn.Module) -> int:
    """Fuse converted projections that share an input (a module's `fanouts`, e.g. q/k/v) into one matmul each:
    fewer, larger kernel calls. The fused layer is set as the first part's `fused` (text.fanout). Returns how many
    groups were fused."""
    n = 0
    for m in list(model.modules()):
        for names in getattr(m, "fanouts", ()):
            parts = [getattr(m, name) for name in names]
            fused = concat(parts)
            if fused is not None:
                parts[0].fused = fused
                n += 1
    return n


def concat(parts: list[nn.Module]) -> Int4Linear | None:
    """One layer computing `parts` (same input, the same kernel and settings, no act-order) side by side, taking
    over their weights; None if they cannot be fused."""
    first = parts[0]
    if not isinstance(first, (Q4x16Linear, Int4PackLinear)) or any(
            type(p) is not type(first) or p.perm is not None or p.in_features != first.in_features
            or (p.bias is None) != (first.bias is None) or p.bulk != first.bulk for p in parts):
        return None
    bias = None if first.bias is None else torch.cat([p.bias for p in parts])
    if isinstance(first, Q4x16Linear):  # whole 16-row blocks per part, along N
        if any(p.exact != first.exact for p in parts):
            return None
        fused = Q4x16Linear(*(torch.cat([getattr(p, n) for p in parts]) for n in ("packed", "scales", "zeros")),
                            first.in_features, bias, None, first.kernels, first.bulk, first.exact)
    else:
        if any(p.group_size != first.group_size for p in parts):
            return None
        fused = Int4PackLinear(torch.cat([p.packed for p in parts]),
                               torch.cat([p.scales.float() for p in parts], dim=1),
                               torch.cat([p.zeros.float() for p in parts], dim=1), first.in_features,
                               first.group_size, bias, None, first.kernels)
    for p in parts:  # the parts keep their names (and shapes) but no longer hold weights
        for name in ("packed", "scale_zero", "scales", "zeros"):
            if hasattr(p, name):
                setattr(p, name, None)
        p.kernel = "fused"
    return fused


# ---------------------------------------------------------------------------------------------------------------
# Where the layouts hold a layer, and torch's int4 packing


def q4x16_fits(group_size: int, out_features: int, scales: torch.Tensor) -> bool:
    """Where the q4x16 layout holds a layer exactly: groups of 128, fp16-exact scales (AWQ/GPTQ store fp16)."""
    return (group_size == 128 and out_features % 16 == 0
            and torch.equal(scales.half().float(), scales.float()))


def int4_cpu_groups(group_size: int) -> bool:
    """Whether torch's int4 CPU kernel (in this torch) takes 4-bit groups of this size."""
    return group_size in (32, 64, 128, 256) and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        int4pack_layout() is not None


def int4_cpu_fits(in_features: int, out_features: int, group_size: int) -> bool:
    """Where torch's int4 CPU kernel applies, on whole packing blocks only (the prefill path dequantizes from them,
    as exactly as float32)."""
    return int4_cpu_groups(group_size) and in_features % group_size == 0 and out_features % int4pack_layout()[0] == 0


@functools.lru_cache(maxsize=1)
def int4pack_layout() -> tuple[int, torch.Tensor] | None:
    """How torch's CPU int4 packing (which depends on the CPU: AVX-512, AVX2 or scalar) lays out nibbles, found by
    packing index patterns: (B, perm) such that the packed bytes, read as nibbles (low, high), form (N/B, K, B)
    slots with slot s of a block holding row perm[s]. None if the packing is not of that form."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
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
