"""Decoding one token for each of up to 16 sequences with the native `decode_layer`: each decoder layer in one native
call instead of ~40 torch ops (whose dispatch alone was a sixth of a decode step on the 2B model), and each weight
read once for all rows.

Swapped in by the plan for layers whose projections all run the native q4x16 kernel (fused q/k/v with bias, fused
gate/up). Each row reads and writes its keys and values in the KV pool through its block table (kv.KVView), in the
pool's storage format. Any other call (prefill, no pool) runs the model's own layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import DecodeLayer
from ..kv import KVView
from .linear import Q4x16Linear
from .mlp import PrefillMLP

def _parts(layer: nn.Module) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    mlp = mlp.mlp if isinstance(mlp, PrefillMLP) else mlp
    return getattr(attn.q_proj, "fused", None), attn.o_proj, getattr(mlp.gate_proj, "fused", None), mlp.down_proj


class NativeDecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, kernels):
        super().__init__()
        self.layer, self.kernels = layer, kernels
        attn = layer.self_attn
        self.struct = DecodeLayer(D=attn.o_proj.out_features, H=attn.n_heads, Hkv=attn.n_kv, hd=attn.head_dim,
                             I=_parts(layer)[3].in_features, eps=layer.input_layernorm.eps)
        self._point()

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The struct's pointer fields and the tensors (the wrapped layer's own buffers) they point into."""
        qkv, o, gu, dn = _parts(self.layer)
        out = {"ln1": self.layer.input_layernorm.weight, "ln2": self.layer.post_attention_layernorm.weight,
               "qkv_b": qkv.bias}
        for name, p in zip(("qkv", "o", "gu", "dn"), (qkv, o, gu, dn)):
            out.update({name + "_w": p.packed, name + "_s": p.scales, name + "_z": p.zeros})
        return out

    def _point(self) -> None:
        self.tensors = self._tensors()  # held, so that no pointer the struct holds can dangle
        for name, t in self.tensors.items():
            setattr(self.struct, name, t.data_ptr())

    def _apply(self, fn, *args, **kwargs):  # module.to() and the like may give the wrapped layer new tensors
        out = super()._apply(fn, *args, **kwargs)
        self._point()
        return out

    @staticmethod
    def applies(layer: nn.Module) -> bool:
        qkv, o, gu, dn = _parts(layer)
        attn, norms = layer.self_attn, (layer.input_layernorm, layer.post_attention_layernorm)
        return all(isinstance(p, Q4x16Linear) and not p.exact and p.perm is None for p in (qkv, o, gu, dn)) \
            and qkv.bias is not None and o.bias is None and gu.bias is None and dn.bias is None \
            and attn.head_dim % 16 == 0 and attn.head_dim <= 512 and attn.n_heads % attn.n_kv == 0 \
            and all(n.weight.dtype == torch.float32 and n.weight.is_contiguous() for n in norms) \
            and gu.out_features == 2 * dn.in_features

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVView | None) -> torch.Tensor:
        B = x.shape[0]
        if not (x.shape[1] == 1 and B <= 16 and isinstance(cache, KVView) and x.dtype == torch.float32
                and cos.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous() and x.is_cpu):
            return self.layer(x, cos, sin, mask, cache)
        out = x.reshape(B, -1).clone()  # (B, D), updated in place
        self.kernels.decode_layer(self.struct, out, cos.reshape(B, -1), sin.reshape(B, -1), cache.pool,
                                  self.layer.self_attn.layer, cache.tables, cache.starts)
        return out.view(x.shape)
