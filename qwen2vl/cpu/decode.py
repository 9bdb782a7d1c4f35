"""Decoding one token for each of up to 16 sequences with the native `decode_layer`: each decoder layer in one native
call instead of ~40 torch ops, whose dispatch alone costs ~0.4 ms per layer (a sixth of a decode step on the 2B
model), and each weight read once for all rows.

Swapped in by the plan for layers whose projections all run the native q4x16 kernel (fused q/k/v with bias, fused
gate/up). Rows may be left-padded (the engine's batch): each row's valid keys must be one run ending at the new
position. Any other call (prefill, other masks, another cache) runs the model's own layer.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..cache import KVCache
from ..quant.linear import QuantLinear
from .mlp import PrefillMLP

_P, _I = ctypes.c_void_p, ctypes.c_int


class _Layer(ctypes.Structure):  # kernels.c's decode_layer_t
    _fields_ = [(n, _I) for n in ("D", "H", "Hkv", "hd", "I")] + [("eps", ctypes.c_float)] + \
        [(n, _P) for n in ("ln1", "ln2", "qkv_w", "o_w", "gu_w", "dn_w", "qkv_s", "o_s", "gu_s", "dn_s",
                           "qkv_z", "o_z", "gu_z", "dn_z", "qkv_b")]


def _parts(layer: nn.Module) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    mlp = mlp.mlp if isinstance(mlp, PrefillMLP) else mlp
    return getattr(attn.q_proj, "fused", None), attn.o_proj, getattr(mlp.gate_proj, "fused", None), mlp.down_proj


class NativeDecoderLayer(nn.Module):
    def __init__(self, layer: nn.Module, kernels):
        super().__init__()
        self.layer, self.kernels = layer, kernels
        attn = layer.self_attn
        self.struct = _Layer(D=attn.o_proj.out_features, H=attn.n_heads, Hkv=attn.n_kv, hd=attn.head_dim,
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
        return all(isinstance(p, QuantLinear) and p.kernel == "q4x16" and p.perm is None for p in (qkv, o, gu, dn)) \
            and qkv.bias is not None and o.bias is None and gu.bias is None and dn.bias is None \
            and attn.head_dim % 16 == 0 and attn.head_dim <= 512 and attn.n_heads % attn.n_kv == 0 \
            and all(n.weight.dtype == torch.float32 and n.weight.is_contiguous() for n in norms) \
            and gu.out_features == 2 * dn.in_features

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        B = x.shape[0]
        if not (x.shape[1] == 1 and B <= 16 and isinstance(cache, KVCache) and x.dtype == torch.float32
                and cache.k.dtype == torch.float32 and cache.k.shape[1] == B and cache.length < cache.capacity
                and cache.k.is_contiguous() and cache.v.is_contiguous() and cos.dtype == torch.float32
                and cos.is_contiguous() and sin.is_contiguous() and x.is_cpu):
            return self.layer(x, cos, sin, mask, cache)
        starts = key_starts(mask)
        if starts is False:
            return self.layer(x, cos, sin, mask, cache)
        out = x.contiguous().clone()  # (B, 1, D), updated in place
        i, s = self.layer.self_attn.layer, cache.k.stride(0) * 4  # this layer's (B, Hkv, cap, hd) cache, in bytes
        self.kernels.lib.decode_layer(ctypes.byref(self.struct), out.data_ptr(), B, cos.data_ptr(), sin.data_ptr(),
                                      cache.k.data_ptr() + i * s, cache.v.data_ptr() + i * s, cache.capacity,
                                      cache.length, None if starts is None else starts.data_ptr(),
                                      torch.get_num_threads())
        return out


_last: tuple = (None, None)  # (mask, its starts): every layer of a step gets the same mask object


def key_starts(mask: torch.Tensor | None) -> torch.Tensor | None | bool:
    """Each row's first valid key (int32, B) from a decode mask (B, 1, 1, S); None without a mask (all valid);
    False when some row's valid keys are not one run ending at the last position."""
    global _last
    if mask is None:
        return None
    if _last[0] is mask:
        return _last[1]
    valid = mask[:, 0, -1] if mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1 else None
    starts: torch.Tensor | bool = False
    if valid is not None:
        S = valid.shape[1]
        first = (S - valid.sum(-1)).to(torch.int32)
        if torch.equal(valid, torch.arange(S) >= first[:, None]):
            starts = first.contiguous()
    _last = (mask, starts)
    return starts
