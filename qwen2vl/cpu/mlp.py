"""The decoder's SwiGLU MLP over a fused, quantized gate/up projection whose prefill matmuls run in bf16, int8 or
int16. In bf16 the gate/up output stays bf16, and silu(gate) * up is one native pass writing the down projection's
bf16 input (the torch ops convert the (rows, 2 x 8960) output to float32 and the product back to bf16, several
times slower). In int8 and int16, silu(gate) * up is computed while rounding the down projection's
input. Decoding (few rows) runs the model's own MLP."""

from __future__ import annotations

import torch
from torch import nn

from .linear import DECODE_ROWS, Q4x16Linear


class PrefillMLP(nn.Module):
    def __init__(self, mlp: nn.Module, kernels):
        super().__init__()
        self.mlp, self.kernels = mlp, kernels

    @staticmethod
    def applies(mlp: nn.Module) -> bool:
        gate_up, down = getattr(mlp.gate_proj, "fused", None), mlp.down_proj
        return isinstance(gate_up, Q4x16Linear) and isinstance(down, Q4x16Linear) and \
            all(p.bulk in (torch.bfloat16, torch.int8, torch.int16) and p.bias is None and p.perm is None and
                p.bulk == down.bulk for p in (gate_up, down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= DECODE_ROWS:
            return self.mlp(x)
        gate_up, down = self.mlp.gate_proj.fused, self.mlp.down_proj
        h = gate_up.many(x2)  # (M, 2I): [gate | up], bf16 or float32
        if down.bulk == torch.int8:
            y = down.matmul_int8(self.kernels.act_quant_i8(h.float(), glu=True))
        elif down.bulk == torch.int16:
            y = down.matmul_int16(h.float(), glu=True)
        else:
            y = down.dequant_matmul(self.kernels.silu_mul_bf16(h.bfloat16()))
        return y.to(x.dtype).view(*x.shape[:-1], -1)
