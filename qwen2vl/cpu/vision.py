"""The vision tower's CPU layers, swapped in by the plan: the rotary of q and k in place on the qkv output (the same
numbers as the torch ops), quick_gelu in one pass (within a few float32 ulps; equal in bf16), where the plan
measured them faster, bf16 linears whose weights oneDNN prepacks at load and a native bf16 attention, and the
linears of the blocks the plan streams, whose weights stay in the checkpoint file."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..memory import scratch
from ..quant import UpcastLinear
from ..vision import quick_gelu, rotate_qk
from ..weights import RowReader


class PackedLinear(nn.Module):
    """A bf16 linear whose weight oneDNN reorders once, at load, into the blocked layout its matmul computes from
    (F.linear reorders it on every call), with the bias added inside the matmul (addmm first copies it into the
    output)."""

    ROWS = 1024  # the input rows oneDNN tunes the layout for (a 448x448 image); as fast at 290 and 4096 rows

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def runs() -> bool:
        """Whether this torch's oneDNN prepacks and multiplies bf16 here: it refuses CPUs without AVX512-BF16-grade
        support ("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")."""
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return False
        try:
            PackedLinear(nn.Linear(32, 16).bfloat16())(torch.ones(2, 32, dtype=torch.bfloat16))
        except RuntimeError:
            return False
        return True

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), self.ROWS)  # opaque layout
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.weight, self.bias, "none", [None], "")
        return y.view(*shape[:-1], self.out_features)


class StreamedLinear(nn.Module):
    """A linear whose weight stays in the checkpoint: on every call it is read (pread, from the page cache) and
    converted to the compute dtype into a reused buffer, so it never counts in RSS. Same numbers as a loaded weight
    (16-bit to float32 is exact; to bf16 rounds as the load would). What it costs per encode: BENCHMARKS.md."""

    CHUNK = 1 << 20  # values converted at a time through a float32 buffer (torch's direct fp16->bf16 is ~3x slower)

    def __init__(self, linear: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.dtype, self.bias, self.rows = dtype, linear.bias, None

    def use_rows(self, rows: RowReader) -> None:
        if rows.shape != (self.out_features, self.in_features):
            raise CheckpointError(f"{rows.path.name}: a weight of shape {list(rows.shape)}, the model expects "
                                  f"{[self.out_features, self.in_features]}")
        self.rows = rows

    def weight(self) -> torch.Tensor:
        N, K = self.rows.shape
        raw = self.rows.read_into(scratch(N * K, self.rows.dtype).view(N, K))
        if raw.dtype == self.dtype:
            return raw
        w = scratch(N * K, self.dtype).view(N, K)
        if self.dtype == torch.float32:
            return w.copy_(raw)
        rows = max(1, self.CHUNK // K)
        for r0 in range(0, N, rows):
            f = scratch(min(rows, N - r0) * K, torch.float32).view(-1, K).copy_(raw[r0:r0 + rows])
            w[r0:r0 + rows].copy_(f)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def stream(visual: nn.Module, ckpt: Path, blocks: int, dtype: torch.dtype) -> tuple[str, ...]:
    """Swap the linears of the first `blocks` blocks of `visual` (built in `dtype`, not loaded) for StreamedLinears
    reading `ckpt`; returns the weight names the loader must skip."""
    names = [f"blocks.{i}.{name}" for i in range(blocks) for name, m in visual.blocks[i].named_modules()
             if isinstance(m, (nn.Linear, UpcastLinear))]
    for name, rows in zip(names, RowReader.open_each(ckpt, [f"visual.{n}.weight" for n in names])):
        parent, _, child = name.rpartition(".")
        layer = StreamedLinear(visual.get_submodule(name), dtype)
        layer.use_rows(rows)
        setattr(visual.get_submodule(parent), child, layer)
    return tuple(f"visual.{n}.weight" for n in names)


class NativeVisionAttention(nn.Module):
    """A bf16 vision attention whose rotary and softmax attention run natively (kernels.c vit_attention_bf16) where
    the segments (images, video slices) are of one length; otherwise the wrapped module's own steps."""

    def __init__(self, attn: nn.Module, kernels):
        super().__init__()
        self.attn, self.kernels = attn, kernels

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments) -> torch.Tensor:
        N, a = x.shape[0], self.attn
        qkv = a.qkv(x).view(N, 3, a.num_heads, -1)
        if qkv.dtype != torch.bfloat16 or segments.index is not None or not qkv.is_contiguous():
            q, k, v = a.rotate(qkv, cos, sin)
            return a.proj(segments.attention(q, k, v).reshape(N, -1))
        self.kernels.rotary_(qkv.view(N, -1), 2 * a.num_heads, cos, sin)
        return a.proj(self.kernels.vit_attention_bf16(qkv, segments.lengths[0]).view(N, -1))


def swap(visual: nn.Module, kernels, packed: bool, attention: bool = False) -> None:
    """Native rotary and quick_gelu from `kernels` (a qwen2vl.kernels.Kernels; None: torch ops), prepacked
    linears if `packed`, and the native bf16 attention if `attention`."""
    if kernels is not None:
        def rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if qkv.dtype in (torch.float32, torch.bfloat16) and qkv.is_contiguous() and qkv.shape[-1] <= 512:
                rows = kernels.rotary_(qkv.view(len(qkv), -1), 2 * qkv.shape[2], cos, sin)  # q's and k's heads
                return rows.view(qkv.shape).unbind(1)
            return rotate_qk(qkv, cos, sin)

        def gelu(x: torch.Tensor) -> torch.Tensor:
            if x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous():
                return kernels.quick_gelu_(x)  # in place: x is the first MLP linear's fresh output
            return quick_gelu(x)

        for block in visual.blocks:
            block.attn.rotate = rotate
            if block.mlp.act is quick_gelu:
                block.mlp.act = gelu
    if attention:
        for block in visual.blocks:
            block.attn = NativeVisionAttention(block.attn, kernels)
    if packed:
        names = [name for name, m in visual.named_modules() if isinstance(m, nn.Linear)]
        for name in names:  # one at a time, no other reference kept: each dense weight is freed as it is packed
            parent, _, child = name.rpartition(".")
            setattr(visual.get_submodule(parent) if parent else visual, child,
                    PackedLinear(visual.get_submodule(name)))
