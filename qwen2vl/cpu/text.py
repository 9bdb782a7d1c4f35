"""The text decoder's CPU layers, swapped in by the plan: RMSNorm in one native pass over float32 rows, the rotary of
q and k in place on the fused q/k/v projection's output (the same numbers as torch's ops), attention over the KV
pool's blocks (kernels.c attention_paged: decode always, prompt chunks where the plan measured it faster than SDPA
over the gathered keys), and, where the plan measured it faster than SDPA, a whole prompt's causal attention in
float32 (kernels.c attention)."""

from __future__ import annotations

import torch
from torch import nn

from ..kv import KVView
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


def native_attend(kernels):
    """An Attention.attend that runs a causal prompt's attention (float32, no mask, as many queries as keys) with
    the native float32 flash attention, anything else with the model's own."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, H, L, D = q.shape
        if mask is None and 1 < L == k.shape[2] and q.dtype == k.dtype == v.dtype == torch.float32 and \
                D % 16 == 0 and D <= 128 and q.stride(3) == k.stride(3) == v.stride(3) == 1:
            out = kernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True, torch.float32,
                                    f32=True)
            return out.view(B, L, H * D)
        return Attention.attend(q, k, v, mask)

    return attend


def native_attend_cached(kernels, chunks: bool):
    """An Attention.attend_cached over the KV pool's blocks (kernels.c attention_paged), float32 queries with each
    head's values contiguous, head dims the kernels take: one new token per row always, prompt chunks if `chunks`
    (where the plan measured it faster than SDPA over the gathered keys); anything else with the model's own."""

    def attend_cached(q: torch.Tensor, view: KVView, layer: int) -> torch.Tensor:
        D = q.shape[-1]
        if q.dtype == torch.float32 and q.stride(3) == 1 and D % 16 == 0 and D <= 128 and (chunks or view.n == 1):
            return kernels.attention_paged(q, view.pool, layer, view.tables, view.starts)
        return Attention.attend_cached(q, view, layer)

    return attend_cached


def swap(text: nn.Module, kernels, attention: bool, chunks: bool) -> None:
    """Native RMSNorms, rotary and attention over the KV pool in the text model `text` (qwen2vl.text.TextModel) (for
    prompt chunks too if `chunks`), and the native whole-prompt attention if `attention`."""
    rotate, attend = native_rotate(kernels), native_attend(kernels)
    attend_cached = native_attend_cached(kernels, chunks)
    for name, m in list(text.named_modules()):
        if isinstance(m, Attention):
            m.rotate, m.attend_cached = rotate, attend_cached
            if attention:
                m.attend = attend
        elif type(m) is RMSNorm:
            parent, _, child = name.rpartition(".")
            setattr(text.get_submodule(parent) if parent else text, child, NativeRMSNorm(m, kernels))
