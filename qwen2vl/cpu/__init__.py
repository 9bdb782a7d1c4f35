"""The CPU wing: the plan (which path each part takes, decided once at load by measurement) and the layers it swaps
in. Model files, quant/ and generate know nothing of CPU capabilities; this package and kernels/ do."""

from __future__ import annotations

from torch import nn

from ..text import MLP
from .decode import NativeDecoderLayer
from .head import ScanHead
from .mlp import PrefillMLP
from .plan import Plan, decide
from .vision import PackedLinear
from . import text as _text, vision as _vision


def swap_after_load(module: nn.Module, plan: Plan) -> None:
    """After loading and fusing: the plan's layers for the text model's norms and rotary, prefill MLPs, one-call
    decode layers and the vision tower."""
    if plan.device != "cpu":
        return
    k = plan.kernels
    if k is not None:
        text = module.model
        if plan.text_kernels:
            _text.swap(text, k, plan.text_attention == "native")
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


__all__ = ["NativeDecoderLayer", "PackedLinear", "Plan", "PrefillMLP", "ScanHead", "decide", "swap_after_load"]
