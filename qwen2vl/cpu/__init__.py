"""The CPU wing: the plan (which path each part takes, decided once at load by measurement) and the layers it swaps
in. Model files, quant/ and generate know nothing of CPU capabilities; this package and kernels/ do."""

from __future__ import annotations

from torch import nn

from ..quant import QuantLinear
from ..text import MLP
from .decode import NativeDecoderLayer
from .head import ScanHead
from .linear import Int4Linear, Int4PackLinear, Q4x16Linear, fuse
from .linear import convert as _convert
from .mlp import PrefillMLP
from .plan import Plan, decide
from .vision import PackedLinear
from . import text as _text, vision as _vision

# The plan's decode path -> the layout each quantized linear is converted to.
_LINEAR_KERNEL = {"native-layer": "q4x16", "q4x16": "q4x16", "float32": "q4x16-float32", "torch-int4": "int4_cpu",
                  "reference": "reference"}


def convert(module: nn.Module, plan: Plan) -> nn.Module:
    """A loaded module as the plan runs it: a QuantLinear converted to the plan's layout where it fits."""
    if not isinstance(module, QuantLinear) or plan.device != "cpu":
        return module
    return _convert(module, _LINEAR_KERNEL[plan.decode], plan.kernels, plan.prefill_dtype)


def swap_after_load(module: nn.Module, plan: Plan) -> None:
    """After loading: projections that share an input fused, then the plan's layers for the text model's norms and
    rotary, prefill MLPs, one-call decode layers and the vision tower."""
    if plan.device != "cpu":
        return
    fuse(module)
    k = plan.kernels
    if k is not None:
        text = module.model
        if plan.text_kernels:
            _text.swap(text, k, plan.text_attention == "native", plan.chunk_attention == "native")
        for name, m in list(text.named_modules()):
            if isinstance(m, MLP) and PrefillMLP.applies(m):
                parent, _, child = name.rpartition(".")
                setattr(text.get_submodule(parent), child, PrefillMLP(m, k))
        if plan.decode == "native-layer":
            for i, layer in enumerate(text.layers):
                if NativeDecoderLayer.applies(layer):
                    text.layers[i] = NativeDecoderLayer(layer, k)
    _vision.swap(module.visual, k if plan.vision_kernels else None, plan.vision_linear == "packed",
                 plan.vision_attention == "native")


__all__ = ["Int4Linear", "Int4PackLinear", "NativeDecoderLayer", "PackedLinear", "Plan", "PrefillMLP", "Q4x16Linear",
           "ScanHead", "convert", "decide", "swap_after_load"]
