"""Checkpoint layouts of group-quantized weights, as pure functions: pack, unpack, dequantize, quantize.

Every format unpacks to one form: q uint8 (N, K) integer levels, scales (G, N), zeros (G, N) integer zero points,
and g_idx (K,) the group of each input feature, so that W[n, k] = (q[n, k] - zeros[g_idx[k], n]) * scales[g_idx[k], n].
"""

from __future__ import annotations

import torch

# AutoAWQ GEMM: nibble i of a packed int32 holds logical column 8c + AWQ_ORDER[i]; logical column j sits in
# nibble AWQ_REVERSE[j % 8].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_columns(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """(R, C) levels -> (R, C * bits / 32) int32, 32/bits consecutive columns per int32; field i holds column
    order[i] of each group (default: in order)."""
    per = 32 // bits
    R, C = values.shape
    v = values.to(torch.int64).view(R, C // per, per)
    order = order or tuple(range(per))
    out = torch.zeros(R, C // per, dtype=torch.int64, device=values.device)
    for field, column in enumerate(order):
        out |= v[:, :, column] << (bits * field)
    return _to_int32(out)


def unpack_columns(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The inverse of pack_columns: (R, C') int32 -> (R, C' * 32 / bits) uint8."""
    per = 32 // bits
    order = order or tuple(range(per))
    field_of = [0] * per
    for field, column in enumerate(order):
        field_of[column] = field
    shifts = torch.tensor([bits * f for f in field_of], dtype=torch.int32, device=packed.device)
    v = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)  # `& mask` undoes the arithmetic shift's sign
    return v.reshape(packed.shape[0], -1).to(torch.uint8)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) levels -> (K * bits / 32, N) int32: 32/bits consecutive rows per int32, in order (GPTQ qweight)."""
    return pack_columns(values.t().contiguous(), bits).t().contiguous()


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_columns(packed.t().contiguous(), bits).t().contiguous()


# ---------------------------------------------------------------------------------------------------------------


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               levels: torch.Tensor | None = None):
    """AWQ GEMM tensors (qweight (K, N/8), qzeros (K/g, N/8), scales (K/g, N)) -> q (N, K), scales, zeros, g_idx.
    `levels`: q already unpacked from qweight (the CPU layers do it natively, ~30x faster)."""
    q = unpack_columns(qweight, 4, AWQ_ORDER).t().contiguous() if levels is None else levels
    zeros = unpack_columns(qzeros, 4, AWQ_ORDER)
    K = q.shape[1]
    return q, scales.float(), zeros.float(), torch.arange(K, device=q.device) // group_size


def awq_pack(q: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) and zeros (G, N) levels -> AWQ qweight (K, N/8) and qzeros (G, N/8)."""
    return pack_columns(q.t().contiguous(), 4, AWQ_ORDER), pack_columns(zeros, 4, AWQ_ORDER)


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group_size: int, zero_offset: int = 1):
    """AutoGPTQ tensors (qweight (K*bits/32, N), qzeros (G, N*bits/32) holding zero - 1 in the v1 format,
    scales (G, N), g_idx (K,)) -> q (N, K), scales, zeros, g_idx."""
    q = unpack_rows(qweight, bits).t().contiguous()
    zeros = unpack_columns(qzeros, bits).float() + zero_offset
    K = q.shape[1]
    if g_idx is None:
        g_idx = torch.arange(K, device=q.device) // group_size
    return q, scales.float(), zeros, g_idx.long()


def gptq_pack(q: torch.Tensor, zeros: torch.Tensor, bits: int, zero_offset: int = 1):
    """q (N, K) and zeros (G, N) levels -> GPTQ qweight (K*bits/32, N) and qzeros (G, N*bits/32)."""
    return pack_rows(q.t().contiguous(), bits), pack_columns((zeros - zero_offset).to(torch.int64), bits)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W (N, K) float32 = (q - zero) * scale, group by group. The reference every kernel is tested against."""
    return (q.float() - zeros[g_idx].t()) * scales[g_idx].t()


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric quantization of W (N, K) per group of `group_size` input features.

    Returns q (N, K) uint8, scales (K/g, N) (rounded to `scale_dtype`, as stored), zeros (K/g, N) integer levels.
    """
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group_size}")
    top = (1 << bits) - 1
    g = w.float().view(N, K // group_size, group_size)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    scales = ((hi - lo) / top).clamp(min=1e-8).to(scale_dtype).float()  # (N, G), as it will be stored
    zeros = (-lo / scales).round().clamp(0, top)
    q = (g / scales[..., None] + zeros[..., None]).round().clamp(0, top).to(torch.uint8).view(N, K)
    return q, scales.t().contiguous(), zeros.t().contiguous()


def q4x16_pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Levels q (N, K) uint8, scales and zeros (G, N) with groups of 128 -> the native kernels' q4x16 layout
    (kernels.c): bytes (N/16, G, 32, 16, 2), fp16 scales and uint8 zeros (N/16, G, 16)."""
    N, K = q.shape
    G = K // 128
    qg = q.view(N // 16, 16, G, 2, 32, 2)  # (block, row, group, half, pair, t)
    packed = (qg[:, :, :, 0] | (qg[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # (block, group, pair, row, t)
    packed = packed.contiguous()
    meta = lambda t, dtype: t.t().reshape(N // 16, 16, G).transpose(1, 2).contiguous().to(dtype)
    return packed, meta(scales, torch.float16), meta(zeros, torch.uint8)


def q8x16_pack(q: torch.Tensor) -> torch.Tensor:
    """Signed levels q (N, K) int8, K % 128 == 0 and N % 16 == 0 -> the native kernels' q8x16 layout (kernels.c):
    bytes (N/16, K/128, 64, 16, 2)."""
    N, K = q.shape
    return q.view(N // 16, 16, K // 128, 64, 2).permute(0, 2, 3, 1, 4).contiguous()
