"""Quantized checkpoints, as layer swaps. The checkpoint decides: before loading, every nn.Linear whose
`{name}.qweight` is in the checkpoint is swapped for a QuantLinear of the config's format (the checkpoint's tensors
and a reference forward). Nothing here knows the model's structure or the CPU: the load plan's faster layers are in
qwen2vl.cpu."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .linear import QuantLinear, UpcastEmbedding, UpcastLinear


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


def swap_quantized(model: nn.Module, cfg: QuantConfig, tensor_names: set[str], dtype: torch.dtype) -> int:
    """Replace the linears the checkpoint stores quantized (biases in `dtype`); returns how many."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and f"{name}.qweight" in tensor_names:
            _replace(model, name, QuantLinear(m.in_features, m.out_features, m.bias is not None, cfg.method,
                                              cfg.bits, cfg.group_size, cfg.zero_offset, dtype))
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


__all__ = ["QuantConfig", "QuantLinear", "UpcastLinear", "UpcastEmbedding", "swap_quantized", "swap_upcast"]
