"""Quantized checkpoints and CPU fast paths, as layer swaps. The checkpoint decides: before loading, every nn.Linear
whose `{name}.qweight` is in the checkpoint is swapped for a QuantLinear of the config's format; after loading, each
picks its kernel once. After loading, on CPU: `prefill_mlps` and `native_decode` swap decoder MLPs and layers for
ones that run parts of prefill and decoding in kernels.c, `native_vision` its elementwise kernels into the vision
tower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..text import MLP
from ..vision import quick_gelu, rotate_qk
from . import native
from .decode import NativeDecoderLayer
from .head import ScanHead
from .linear import PackedLinear, QuantLinear, UpcastEmbedding, UpcastLinear
from .mlp import PrefillMLP


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "awq" | "gptq"
    bits: int
    group_size: int
    zero_offset: int = 1  # GPTQ v1 stores zero - 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        method = str(d.get("quant_method", "")).lower()
        bits, group = int(d.get("bits", 4)), int(d.get("group_size", 128))
        if group <= 0:
            raise ConfigError(f"quantization_config: group_size {group} is not supported (per-channel: use 128-style "
                              "groups)")
        if method == "awq":
            if bits != 4 or str(d.get("version", "gemm")).lower() != "gemm" or not d.get("zero_point", True):
                raise ConfigError(f"quantization_config: only AWQ GEMM 4-bit with zero points is supported, got {d}")
            return cls("awq", 4, group)
        if method == "gptq":
            if bits not in (4, 8):
                raise ConfigError(f"quantization_config: GPTQ with {bits} bits is not supported (4 or 8)")
            return cls("gptq", bits, group, 0 if d.get("checkpoint_format") == "gptq_v2" else 1)
        raise ConfigError(f"quantization_config: quant_method {method!r} is not supported (awq, gptq)")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def swap_quantized(model: nn.Module, cfg: QuantConfig, tensor_names: set[str], dtype: torch.dtype,
                   bulk_dtype: torch.dtype | None = None) -> int:
    """Replace the linears the checkpoint stores quantized (biases in `dtype`; matmuls over many rows in
    `bulk_dtype`, default `dtype`); returns how many."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and f"{name}.qweight" in tensor_names:
            _replace(model, name, QuantLinear(m.in_features, m.out_features, m.bias is not None, cfg.method,
                                              cfg.bits, cfg.group_size, cfg.zero_offset, dtype, bulk_dtype))
            n += 1
    return n


def swap_upcast(model: nn.Module, storage_dtype: torch.dtype, dtype: torch.dtype) -> None:
    """Keep this part's linear and embedding weights in `storage_dtype`, computing (and keeping biases) in `dtype`."""
    if isinstance(model, (nn.Linear, nn.Embedding)):
        raise TypeError("pass the parent module")
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Embedding):
            _replace(model, name, UpcastEmbedding(m.num_embeddings, m.embedding_dim, storage_dtype, dtype))
        elif isinstance(m, nn.Linear):
            _replace(model, name, UpcastLinear(m.in_features, m.out_features, m.bias is not None, storage_dtype,
                                               dtype))


def prepare(model: nn.Module) -> None:
    """After loading: every QuantLinear in `model` (or `model` itself) picks its kernel and converts its weights."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and not m.prepared:
            m.prepare()


def fuse(model: nn.Module) -> int:
    """Fuse quantized projections that share an input (a module's `fanouts`, e.g. q/k/v) into one matmul each:
    fewer, larger kernel calls. Returns how many groups were fused."""
    n = 0
    for m in list(model.modules()):
        for names in getattr(m, "fanouts", ()):
            parts = [getattr(m, name) for name in names]
            if all(isinstance(p, QuantLinear) for p in parts):
                fused = QuantLinear.concat(parts)
                if fused is not None:
                    parts[0].fused = fused
                    n += 1
    return n


def prefill_mlps(model: nn.Module) -> int:
    """After `fuse`: decoder MLPs whose fused gate/up and down projections prefill in bf16 with kernels.c become
    PrefillMLPs (see quant/mlp.py). Returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, MLP) and PrefillMLP.applies(m)]
    for name in names:
        _replace(model, name, PrefillMLP(model.get_submodule(name)))
    return len(names)


def native_decode(text: nn.Module) -> int:
    """After `fuse`: decoder layers whose projections all run kernels.c's q4x4 kernel decode one token in one
    native call (quant/decode.py). Returns how many."""
    n = 0
    for i, layer in enumerate(text.layers):
        if NativeDecoderLayer.applies(layer):
            text.layers[i] = NativeDecoderLayer(layer)
            n += 1
    return n


def native_vision(visual: nn.Module) -> None:
    """After loading, CPU kernels for the vision tower (no-op without kernels.c): the rotary of q and k in place on
    the qkv output (the same numbers as the torch ops), quick_gelu in one pass (AVX-512; within a few float32 ulps,
    equal in bf16), and for a bf16 tower on a CPU with bf16 matrix instructions, oneDNN-prepacked linears."""
    if native.library() is None:
        return
    for block in visual.blocks:
        block.attn.rotate = _rotate_qk
        if block.mlp.act is quick_gelu and native.gemv_supported():
            block.mlp.act = _quick_gelu
    if PackedLinear.supported(visual.merger.ln_q.weight.dtype):
        names = [name for name, m in visual.named_modules() if isinstance(m, nn.Linear)]
        for name in names:  # one at a time, no other reference kept: each dense weight is freed as it is packed
            _replace(visual, name, PackedLinear(visual.get_submodule(name)))


def _rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if qkv.dtype in (torch.float32, torch.bfloat16) and qkv.is_contiguous() and qkv.shape[-1] <= 512:
        return native.rotary_qk(qkv, cos, sin).unbind(1)
    return rotate_qk(qkv, cos, sin)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous():
        return native.quick_gelu_(x)  # in place: x is the first MLP linear's fresh output
    return quick_gelu(x)


__all__ = ["fuse", "native_decode", "native_vision", "prefill_mlps", "NativeDecoderLayer", "PackedLinear",
           "PrefillMLP", "QuantConfig", "QuantLinear", "ScanHead", "UpcastLinear",
           "UpcastEmbedding", "swap_quantized", "swap_upcast", "prepare"]
