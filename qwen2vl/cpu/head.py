"""An LM head for decoding on CPU: an int8 scan of the whole vocabulary, then exact float32 logits for the best
candidates, with a proof that the greedy choice is the exact one.

The 151936 x 1536 head is a quarter of the weights read per decoded token. Its 16-bit weights (tied to the
embeddings, read from the file on demand) are also kept as int8 rows with one scale each (the native q8x16 kernel, or
torch's int8 weight-only kernel without native kernels: half the bytes). Per row of input:
  1. approximate logits of every token from the int8 copy;
  2. exact logits (float32 from the 16-bit weights) of the top REFINE tokens, written over their approximations;
  3. a bound on |approximate - exact| (rounding of the weights, of the activations and of the sums)
     decides whether any other token could beat the best refined one; if one could, more tokens are refined, up to
     the whole vocabulary.
So the argmax of the returned logits is always the exact argmax, and the top REFINE logits are exact; the others are
within the bound (about 1% of the logits' spread). Inputs of more than SCAN_ROWS rows (`Qwen2VL.logits` over a
prompt) take the exact path.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..quant.formats import q8x16_pack


REFINE = 128  # tokens refined exactly per row, first try
SCAN_ROWS = 16
CHUNK_ROWS = 8192
QUANT_ROWS = 1024  # rows quantized at a time at load (a few MB of temporaries)


class ScanHead(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, storage_dtype: torch.dtype,
                 dtype: torch.dtype = torch.float32, kernels=None):
        super().__init__()
        self.kernels = kernels  # a qwen2vl.kernels.Kernels, or None: torch's int8 kernel
        if bias or dtype != torch.float32:
            raise ValueError("ScanHead computes float32 logits without a bias")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=storage_dtype), requires_grad=False)
        self.q8 = self.scale = None  # filled by quantize() after loading; not checkpoint tensors
        self.native = False
        self.widened = 0  # rows whose proof needed more than REFINE exact logits (statistics)
        self.full = 0  # rows that needed the whole vocabulary exactly

    def use_rows(self, rows) -> None:
        """Take the 16-bit weights from `rows` (a weights.RowReader: rows read from the file on demand, in place of
        the weight parameter) and build the int8 copy from it."""
        del self.weight
        self.weight = rows
        self.quantize(rows[r0:r0 + QUANT_ROWS] for r0 in range(0, rows.shape[0], QUANT_ROWS))

    def quantize(self, rows: Iterator[torch.Tensor]) -> None:
        """Fill the int8 copy from the weight's rows, given in order in blocks of a multiple of 16 rows."""
        V, D = self.weight.shape
        self.native = self.kernels is not None and V % 16 == 0 and D % 128 == 0
        # native: float32 scales, rows interleaved 16 at a time (kernels.c "q8x16"); torch's kernel: bf16 scales.
        self.q8 = torch.empty(V // 16, D // 128, 64, 16, 2, dtype=torch.int8) if self.native else \
            torch.empty(V, D, dtype=torch.int8)
        self.scale = torch.empty(V, dtype=torch.float32 if self.native else torch.bfloat16)
        r0 = 0
        for w in rows:
            w, n = w.float(), len(w)
            amax = w.abs().amax(1)
            s = (amax / 127).clamp_min(1e-30).to(self.scale.dtype)
            # bf16 scales are rounded up, so no weight exceeds 127 steps
            s = torch.where(s.float() * 127 < amax, torch.nextafter(s, torch.full_like(s, 1e30)), s)
            q = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
            if self.native:
                self.q8[r0 // 16:(r0 + n) // 16] = q8x16_pack(q)
            else:
                self.q8[r0:r0 + n] = q
            self.scale[r0:r0 + n] = s
            r0 += n
        assert r0 == V, (r0, V)
        self.scale_max = float(self.scale.float().max())

    def scan(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Approximate logits (M, V) of x (M, D), and the terms of their error bound: token t of row m is off by at
        most scale[t] * c[m] + |approx| * rel + abs (returned as approx, c (M, 1), rel, abs)."""
        if self.native:
            approx = self.kernels.q8x16_gemv(x, self.q8, self.scale)
            # weights: s/2 |x|_1; activations rounded to int16 per 128 (kernels.c): 127 s D max|x| / 65534;
            # float32 sums: relative 1e-4.
            D = x.shape[-1]
            c = 0.51 * x.abs().sum(-1, keepdim=True) + 127 * D / 65534 * x.abs().amax(-1, keepdim=True)
            return approx, c, 1e-4, 1e-4
        approx = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q8, self.scale).float()
        # weights: s/2 |x|_1; bf16 activations: 127 * 2^-9 s |x|_1; bf16 output: 2^-8 |approx|; float32 sums.
        return approx, 0.76 * x.abs().sum(-1, keepdim=True), 2**-8, 1e-3

    def bound(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate logits (M, V) of x and the whole bound on their error (M, V)."""
        approx, c, rel, abs_ = self.scan(x)
        return approx, self.scale.float() * c + approx.abs() * rel + abs_

    def exact(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits from the 16-bit weights: all tokens (x (M, D) -> (M, V)), or `rows` (M, R) -> (M, R)."""
        if rows is not None:  # each distinct row read once for all of x's rows (batched rows share many)
            uniq, inv = rows.unique(return_inverse=True)
            return (self.weight[uniq].to(x.dtype) @ x.t()).t().gather(1, inv)
        out = x.new_empty(x.shape[0], self.weight.shape[0])
        for r0 in range(0, self.weight.shape[0], CHUNK_ROWS):
            w = self.weight[r0:r0 + CHUNK_ROWS]
            torch.matmul(x, w.to(x.dtype).t(), out=out[:, r0:r0 + len(w)])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] > SCAN_ROWS:
            return self.exact(x2).view(*shape[:-1], -1)
        approx, c, rel, abs_ = self.scan(x2)
        ranked = top_indices(approx, REFINE + 1)  # (M, k + 1), best first
        idx = ranked[:, :REFINE]
        exact = self.exact(x2, idx)
        best = exact.amax(-1)
        # Proven when the best refined logit beats every other token's bound. First with the largest scale for all
        # (the bound then peaks at the best token not refined), over the whole vocabulary only where that fails.
        nxt = approx.gather(-1, ranked[:, REFINE:])[:, 0]
        unsure = best <= nxt + nxt.abs() * rel + self.scale_max * c[:, 0] + abs_
        out = approx.scatter_(-1, idx, exact)  # the refined tokens' entries are excluded from `upper` below
        for m in unsure.nonzero()[:, 0].tolist():  # rare: flat distributions
            upper = (out[m] + self.scale.float() * c[m] + out[m].abs() * rel + abs_).index_fill_(
                0, idx[m], float("-inf"))  # exact <= upper for every token not refined
            if float(best[m]) <= float(upper.max()):
                out[m] = self._widen(x2[m], out[m], upper, float(best[m]))
        return out.view(*shape[:-1], -1)

    def _widen(self, x: torch.Tensor, logits: torch.Tensor, upper: torch.Tensor, best: float) -> torch.Tensor:
        """Refine the tokens of highest bound (upper: -inf where already exact) until the best exact logit beats
        every remaining bound; past a quarter of the vocabulary, all of it."""
        self.widened += 1
        k = REFINE * 8
        while k < logits.shape[0] // 4:
            idx = upper.topk(k).indices
            exact = self.exact(x[None], idx[None])[0]
            logits.index_put_((idx,), exact)
            upper = upper.index_fill(0, idx, float("-inf"))
            best = max(best, float(exact.max()))
            if best > float(upper.max()):
                return logits
            k *= 8
        self.full += 1
        return self.exact(x[None])[0]


def top_indices(x: torch.Tensor, k: int, block: int = 128) -> torch.Tensor:
    """Indices (M, k) of the k largest values of each row of x (M, V), as x.topk(k) (up to ties), in ~1/5 of its
    time over a vocabulary: the k largest lie in the k blocks of `block` values with the largest maxima, so only
    those k * block candidates are ranked."""
    M, V = x.shape
    if V % block or V // block <= k:
        return x.topk(k, dim=-1).indices
    blocks = x.view(M, V // block, block).amax(-1).topk(k, dim=-1).indices  # (M, k)
    cand = (blocks[:, :, None] * block + torch.arange(block, device=x.device)).view(M, -1)  # (M, k * block)
    return cand.gather(-1, x.gather(-1, cand).topk(k, dim=-1).indices)
