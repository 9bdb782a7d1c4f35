"""The Qwen2 text decoder: pre-RMSNorm blocks with GQA attention (q/k/v biases) under M-RoPE,
and a SwiGLU MLP. Parameter names follow the checkpoints (`model.layers.{i}.self_attn.q_proj`, ...).

Keys and values live in a pool of blocks (kv.KVPool) owned by generation, which passes in a view of the rows' block
tables (kv.KVView); without one, attention runs over the forward's own keys (a whole prompt, `logits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kv
from .config import TextConfig
from .kv import KVView
from .rope import apply_rotary


def fanout(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """The outputs of linears that share the input x. A loader may have fused them into one matmul: it sets
    `linears[0].fused` to a module whose output is their outputs side by side."""
    fused = getattr(linears[0], "fused", None)
    if fused is None:
        return [f(x) for f in linears]
    return list(fused(x).split([f.out_features for f in linears], dim=-1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the same formula as one op (twice per layer per token)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)  # cast before the weight, as the reference does


class Attention(nn.Module):
    fanouts = [("q_proj", "k_proj", "v_proj")]  # projections of one input, fusable (see `fanout`)

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    @staticmethod
    def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q (B, L, H, D) and k (B, L, Hkv, D) under M-RoPE (cos, sin (B, L, 1, D)). The CPU plan may set an
        instance's `rotate` to an in-place native kernel with the same numbers."""
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax attention of q (B, H, L, D) over k, v (B, Hkv, S, D) -> (B, L, H * D); mask (B, 1, L, S), or None
        for every key (one query) or causal (L == S). The CPU plan may set an instance's `attend` to a native one."""
        B, H, L, D = q.shape
        if L == 1 and mask is None:  # decoding: each kv head's query heads as its queries (2x faster than GQA SDPA)
            out = F.scaled_dot_product_attention(q.view(B, k.shape[1], -1, D), k, v).view(B, H, 1, D)
        else:  # no mask for L > 1: a causal prompt without padding (attention_mask), ~2x less work in SDPA
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=H != k.shape[1])
        return out.transpose(1, 2).reshape(B, L, -1)

    # Attention of q (B, L, H, D) over the pool's keys through a KVView -> (B, L, H * D); the CPU plan may set an
    # instance's `attend_cached` to a native one (kernels.c attention_paged).
    attend_cached = staticmethod(kv.attend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVView | None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = fanout(x, self.q_proj, self.k_proj, self.v_proj)
        q, k = self.rotate(q.reshape(B, L, self.n_heads, self.head_dim), k.reshape(B, L, self.n_kv, self.head_dim),
                           cos, sin)
        v = v.reshape(B, L, self.n_kv, self.head_dim)
        if cache is not None:
            cache.write(self.layer, k, v)  # post-rotary keys
            return self.o_proj(self.attend_cached(q, cache, self.layer))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D), (B, Hkv, L, D)
        return self.o_proj(self.attend(q, k, v, mask))


class MLP(nn.Module):
    fanouts = [("gate_proj", "up_proj")]

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fanout(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    """Token embeddings, decoder layers and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        # No random init (the checkpoint fills it): normal_ on the loader's meta device costs a 1.6 s first import.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVView | None = None) -> torch.Tensor:
        """embeds (B, L, D), cos/sin (B, L, head_dim), mask bool (B, 1, L, S) or None -> hidden (B, L, D)."""
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, L, 1, D): broadcast over heads
        h = embeds
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.norm(h)


def attention_mask(key_valid: torch.Tensor, q_len: int) -> torch.Tensor | None:
    """Causal + padding mask (B, 1, q_len, S), True = attend, for the last q_len of S keys.

    key_valid (B, S) marks real (non-pad) keys. A query with no valid key before it (a left pad) attends to itself
    alone, so no row is fully masked (SDPA would give NaN there). None when there is no padding and the queries are
    either one (decode: every key may be seen) or all S positions (plain causal attention, SDPA's is_causal).
    """
    S = key_valid.shape[1]
    if (q_len == 1 or q_len == S) and bool(key_valid.all()):
        return None
    q_idx = torch.arange(S - q_len, S, device=key_valid.device)[:, None]
    k_idx = torch.arange(S, device=key_valid.device)[None, :]
    mask = (k_idx <= q_idx) & key_valid[:, None, None, :].bool()
    return mask | (k_idx == q_idx)
