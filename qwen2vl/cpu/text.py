"""The text decoder's CPU layers, swapped in by the plan: RMSNorm in one native pass over float32 rows (torch's op is
five passes on a CPU: ~6 ms against ~0.5 ms for 1024 rows of the 2B model), and the rotary of q and k in place on
the fused q/k/v projection's output (the same numbers as torch's ops)."""

from __future__ import annotations

import torch
from torch import nn

from ..text import Attention, RMSNorm


class NativeRMSNorm(RMSNorm):
    """The same formula as RMSNorm, its sums of squares in another order (kernels.c rms_norm)."""

    def __init__(self, norm: RMSNorm, kernels):
        nn.Module.__init__(self)
        self.weight, self.eps, self.kernels = norm.weight, norm.eps, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and x.is_contiguous():
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def native_rotate(kernels):
    """An Attention.rotate that rotates q and k in place where they are the first heads of the rows of one fused
    projection output (kernels.rotary_), else runs the model's own."""

    def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, L, H, D = q.shape
        row = q.stride(1)
        if q.dtype == k.dtype == cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and \
                sin.is_contiguous() and cos.numel() == B * L * D and q.stride() == (L * row, row, D, 1) and \
                k.stride() == q.stride() and k.data_ptr() == q.data_ptr() + H * D * q.element_size() and D <= 512:
            kernels.rotary_(q.as_strided((B * L, (H + k.shape[2]) * D), (row, 1)), H + k.shape[2], cos, sin)
            return q, k
        return Attention.rotate(q, k, cos, sin)

    return rotate


def swap(text: nn.Module, kernels) -> None:
    """Native RMSNorms and rotary in the text model `text` (qwen2vl.text.TextModel)."""
    rotate = native_rotate(kernels)
    for name, m in list(text.named_modules()):
        if isinstance(m, Attention):
            m.rotate = rotate
        elif type(m) is RMSNorm:
            parent, _, child = name.rpartition(".")
            setattr(text.get_submodule(parent) if parent else text, child, NativeRMSNorm(m, kernels))
