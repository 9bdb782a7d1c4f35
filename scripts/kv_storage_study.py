"""How many bits keys and values need on the 2B shape: simulated KV storage schemes against float32 keys and values.

Each scheme rounds the keys and values as they are stored (quantize, then back to float32, in a float32 pool), so
any rounding can be measured before a kernel exists for it; the native kernels then read them as float32. One fast
model (its plan's other paths fixed), a text prompt of N tokens prefilled in chunks of 256; each position's argmax
against float32 storage's, and the largest logit difference. With --outliers, the decoder's outlier channels as in
fast_paths_accuracy.py. BENCHMARKS.md ("Long prompts") gives the results and what they imply for decode at depth.

Usage: python scripts/kv_storage_study.py [N (default 2048)] [--outliers] [--schemes=f16,u8,...]
"""

import sys
from pathlib import Path

import torch

from qwen2vl import Qwen2VL, kv
from qwen2vl.datatypes import ModelInputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_paths_accuracy import CHUNK, add_outlier_channels, forward, pool_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def asymmetric(x: torch.Tensor, group: int, bits: int = 8) -> torch.Tensor:
    """Levels of (max - min) / (2^bits - 1) from the minimum, per group of `group` values of each row."""
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-30)
    return (((g - lo) / step).round().clamp(0, 2 ** bits - 1) * step + lo).reshape(x.shape)


def symmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed levels of max |x| / (2^(bits-1) - 1) per row."""
    top = 2 ** (bits - 1) - 1
    step = (x.abs().amax(-1, keepdim=True) / top).clamp(min=1e-30)
    return (x / step).round().clamp(-top, top) * step


def half(x):
    return x.half().float()


def bf16(x):
    return x.bfloat16().float()


SCHEMES = {  # name: (keys, values)
    "float16": (half, half),
    "bfloat16": (bf16, bf16),
    "uint8 per token and head": (lambda x: asymmetric(x, 128), lambda x: asymmetric(x, 128)),
    "uint8, groups of 64": (lambda x: asymmetric(x, 64), lambda x: asymmetric(x, 64)),
    "uint8, groups of 32": (lambda x: asymmetric(x, 32), lambda x: asymmetric(x, 32)),
    "keys float16, values uint8": (half, lambda x: asymmetric(x, 128)),
    "keys uint8, values float16": (lambda x: asymmetric(x, 128), half),
    "13-bit integers per token and head": (lambda x: symmetric(x, 13), lambda x: symmetric(x, 13)),
    "12-bit integers per token and head": (lambda x: symmetric(x, 12), lambda x: symmetric(x, 12)),
}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    tokens = int(args[0]) if args else 2048
    chosen = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--schemes=")), list(SCHEMES))
    model = Qwen2VL.from_pretrained(ROOT / "checkpoints" / "qwen2-vl-2b-instruct-random-awq", progress=False)
    if "--outliers" in sys.argv:
        add_outlier_channels(model)
    m = model.model
    rounding = {}  # id(pool) -> (keys, values)
    store = kv.KVPool.store

    def rounded_store(self, layer, blocks, slots, k, v):
        fk, fv = rounding.get(id(self), (None, None))
        return store(self, layer, blocks, slots, fk(k) if fk else k, fv(v) if fv else v)

    kv.KVPool.store = rounded_store
    ids = torch.randint(1000, 100000, (1, tokens), generator=torch.Generator().manual_seed(1))
    positions, _ = m.positions(ModelInputs(ids, torch.ones_like(ids)))
    pools = {name: pool_for(model, tokens, "float32") for name in ["float32", *chosen]}
    for name in chosen:
        rounding[id(pools[name][0])] = SCHEMES[name]
    agree, diff = dict.fromkeys(chosen, 0), dict.fromkeys(chosen, 0.0)
    with torch.inference_mode():
        for lo in range(0, tokens, CHUNK):
            embeds = m.model.embed_tokens(ids[:, lo:lo + CHUNK])
            logits = {name: m.lm_head(forward(m, pool, table, embeds, positions[:, :, lo:lo + CHUNK], lo)).float()
                      for name, (pool, table) in pools.items()}
            ref = logits["float32"]
            for name in chosen:
                agree[name] += int((logits[name].argmax(-1) == ref.argmax(-1)).sum())
                diff[name] = max(diff[name], (logits[name] - ref).abs().max().item())
    print(f"| KV storage, simulated ({tokens}-token text prompt{', outliers' if '--outliers' in sys.argv else ''}) "
          "| prompt argmax agreement vs float32 | prompt logits: max abs diff |")
    print("|---|---|---|")
    for name in chosen:
        print(f"| {name} | {agree[name] / tokens:.4f} | {diff[name]:.3g} |")


if __name__ == "__main__":
    main()
