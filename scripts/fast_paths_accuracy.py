"""Accuracy of the CPU fast paths on the real 2B AWQ shape (random weights), against the float32 reference.

The reference is `fast=False`'s `logits()` over a whole sequence: every quantized matmul dequantized and computed in
float32, the 16-bit vision tower and LM head computed in float32. Measured for a text prompt and for a 448x448 image
plus a question:
  - prompt logits with the fast defaults (bf16 vision and prefill matmuls where the CPU has them);
  - decode: 32 greedy steps of the fast model (its int4 decode kernel and the LM head's int8 scan), each step's
    logits against the reference logits of the same sequence (teacher-forced), and whether each greedy choice
    equals the reference argmax.
With --outliers, a few hidden channels of the decoder carry activations ~30x larger than the rest, as in trained
Qwen2 models (random weights have none): both models' RMSNorm weights are scaled up on 4 channels, so every
projection's input has them. Run it under QWEN2VL_ISA=... to measure another kernel level's plan.

With --kv=N, the KV pool's storage formats instead: float16 and uint8 keys and values against float32 ones, on one
fast model, over a text prompt of N tokens prefilled in chunks and 32 greedy decode steps.

Usage: python scripts/fast_paths_accuracy.py [checkpoint] [--outliers] [--kv=4096]  (default checkpoint:
checkpoints/qwen2-vl-2b-instruct-random-awq, built by `qwen2vl bench`).
"""

import sys
from pathlib import Path

import torch

from qwen2vl import Qwen2VL
from qwen2vl.datatypes import ModelInputs
from qwen2vl.kv import KVPool, KVView, blocks_for

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 256  # prompt tokens per forward, as the engine prefills


def pool_for(model, tokens: int, fmt: str) -> tuple[KVPool, torch.Tensor]:
    """A KV pool in `fmt` with room for one sequence of `tokens`, and its block table (1, T)."""
    t = model.config.text
    n = blocks_for(tokens)
    pool = KVPool(t.num_hidden_layers, t.num_key_value_heads, t.head_dim,
                  n * KVPool.block_bytes(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, fmt), fmt)
    return pool, torch.arange(n, dtype=torch.int32)[None]


def forward(model, pool, table, embeds, positions, start: int) -> torch.Tensor:
    """Hidden states of the positions from `start` on, their keys and values stored in `pool`."""
    view = KVView(pool, table, torch.tensor([start], dtype=torch.int32), embeds.shape[1])
    return model(embeds, positions, cache=view)


def decode_logits(model, x: ModelInputs, steps: int, fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode with the model's decode path and KV storage (default: its plan's): (steps, V) logits at each step
    and the (steps,) chosen tokens. The prompt is prefilled in chunks, as the engine does."""
    m = model.model
    L = x.input_ids.shape[1]
    pool, table = pool_for(model, L + steps, fmt or model.plan.kv_format)
    positions, deltas = m.positions(x)
    with torch.inference_mode():
        embeds = m.prompt_embeddings(x)
        for lo in range(0, L, CHUNK):
            hidden = forward(m, pool, table, embeds[:, lo:lo + CHUNK], positions[:, :, lo:lo + CHUNK], lo)
        out, tokens = [], []
        for i in range(steps):
            logits = m.lm_head(hidden[:, -1]).float()
            out.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            pos = torch.tensor([L + i]).view(1, 1, 1) + deltas.view(1, -1, 1)
            hidden = forward(m, pool, table, m.model.embed_tokens(torch.tensor([[tokens[-1]]])),
                             pos.expand(3, -1, 1), L + i)
    return torch.stack(out), torch.tensor(tokens)


def kv_accuracy(model, tokens: int, steps: int = 32) -> None:
    """KV storage formats against float32 keys and values, on one model (its plan's other paths fixed): a text prompt
    of `tokens` prefilled in chunks, each position's argmax against float32 KV's; then `steps` greedy decode steps of
    each format, each step's choice against float32 KV's argmax on the same sequence (teacher-forced)."""
    m = model.model
    ids = torch.randint(1000, 100000, (1, tokens), generator=torch.Generator().manual_seed(1))
    x = ModelInputs(ids, torch.ones_like(ids))
    positions, _ = m.positions(x)
    print(f"| KV storage ({tokens}-token text prompt) | prompt argmax agreement vs float32 KV | prompt logits: max abs "
          "diff (scale) | decode greedy = float32 KV argmax |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        ref_scale = 0.0
        states = {fmt: pool_for(model, tokens + steps, fmt) for fmt in ("float32", "float16", "uint8")}
        agree = {fmt: 0 for fmt in states}
        diff = {fmt: 0.0 for fmt in states}
        for lo in range(0, tokens, CHUNK):
            embeds = m.model.embed_tokens(ids[:, lo:lo + CHUNK])
            logits = {fmt: m.lm_head(forward(m, pool, table, embeds, positions[:, :, lo:lo + CHUNK], lo)).float()
                      for fmt, (pool, table) in states.items()}
            ref = logits["float32"]
            ref_scale = max(ref_scale, ref.abs().max().item())
            for fmt, got in logits.items():
                agree[fmt] += int((got.argmax(-1) == ref.argmax(-1)).sum())
                diff[fmt] = max(diff[fmt], (got - ref).abs().max().item())
    for fmt in ("float16", "uint8"):
        dec, chosen = decode_logits(model, x, steps, fmt)
        seq = torch.cat([ids, chosen[None, :-1]], dim=1)
        ref_dec = teacher_forced(model, seq, tokens)
        same = int((chosen == ref_dec.argmax(-1)).sum())
        print(f"| {fmt} | {agree[fmt] / tokens:.4f} | {diff[fmt]:.3g} ({ref_scale:.2f}) | {same}/{steps} |")


def teacher_forced(model, seq: torch.Tensor, start: int) -> torch.Tensor:
    """Logits (from position start - 1 on) of `seq` with float32 KV, prefilled in chunks."""
    m = model.model
    x = ModelInputs(seq, torch.ones_like(seq))
    positions, _ = m.positions(x)
    pool, table = pool_for(model, seq.shape[1], "float32")
    out = []
    with torch.inference_mode():
        for lo in range(0, seq.shape[1], CHUNK):
            hidden = forward(m, pool, table, m.model.embed_tokens(seq[:, lo:lo + CHUNK]),
                             positions[:, :, lo:lo + CHUNK], lo)
            out.append(hidden)
        hidden = torch.cat(out, dim=1)[:, start - 1:]
        return m.lm_head(hidden).float()[0]


OUTLIER_CHANNELS, OUTLIER_GAIN = [17, 404, 931, 1290], 30.0


def add_outlier_channels(model) -> None:
    """Scale the decoder's RMSNorm weights up on a few channels, in place (the native decode layer points at them)."""
    with torch.no_grad():
        for layer in model.model.model.layers:
            layer = getattr(layer, "layer", layer)  # a NativeDecoderLayer wraps the model's layer
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[OUTLIER_CHANNELS] *= OUTLIER_GAIN


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    ckpt = Path(args[0]) if args else ROOT / "checkpoints" / "qwen2-vl-2b-instruct-random-awq"
    kv_tokens = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--kv=")), 0)
    exact = None if kv_tokens else Qwen2VL.from_pretrained(ckpt, fast=False, progress=False)
    fast = Qwen2VL.from_pretrained(ckpt, progress=False)
    if "--outliers" in sys.argv:
        for model in (exact, fast):
            if model is not None:
                add_outlier_channels(model)
        print(f"outlier channels {OUTLIER_CHANNELS} x{OUTLIER_GAIN:g} at every decoder RMSNorm")
    p = fast.plan
    print(f"fast paths (plan): kernels {p.isa}, vision {p.vision_dtype}, prefill {p.prefill_dtype}, decode {p.decode}, "
          f"head {p.head}, KV {p.kv_format}")
    if kv_tokens:
        return kv_accuracy(fast, kv_tokens)
    image = ROOT.parent / "shared" / "assets" / "images" / "astronaut.png"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 100000, (1, 256), generator=g)
    cases = {"text 256 tokens": ModelInputs(ids, torch.ones_like(ids)),
             "448x448 image + question": fast.processor([[{"role": "user", "content": [
                 {"type": "image", "image": str(image), "resized_height": 448, "resized_width": 448},
                 {"type": "text", "text": "Describe this image."}]}]])}
    print("| input | prompt logits: max abs diff (scale) | prompt argmax agreement | decode: max abs diff | "
          "decode greedy = reference argmax |")
    print("|---|---|---|---|---|")
    for name, x in cases.items():
        ref = exact.logits(x)[0]
        got = fast.logits(x)[0]
        scale = ref.abs().max().item()
        prompt_diff = (got - ref).abs().max().item()
        prompt_agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        steps = 32
        dec, tokens = decode_logits(fast, x, steps)
        seq = torch.cat([x.input_ids, tokens[None, :-1]], dim=1)
        full = ModelInputs(seq, torch.ones_like(seq), x.pixel_values, x.image_grid_thw)
        ref_dec = exact.logits(full)[0, x.input_ids.shape[1] - 1:]
        # Only the top REFINE logits of a decode step are exact; the rest are within the scan's bound.
        dec_diff = (dec - ref_dec).abs().max().item()
        top = ref_dec.topk(128, dim=-1).indices
        top_diff = (dec.gather(1, top) - ref_dec.gather(1, top)).abs().max().item()
        agree = (tokens == ref_dec.argmax(-1)).sum().item()
        print(f"| {name} | {prompt_diff:.3g} ({scale:.2f}) | {prompt_agree:.3f} | {dec_diff:.3g} all, "
              f"{top_diff:.3g} top 128 | {agree}/{steps} |")


if __name__ == "__main__":
    main()
