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

Usage: python scripts/fast_paths_accuracy.py [checkpoint] [--outliers]  (default checkpoint:
checkpoints/qwen2-vl-2b-instruct-random-awq, built by `qwen2vl bench`).
"""

import sys
from pathlib import Path

import torch

from qwen2vl import Qwen2VL
from qwen2vl.datatypes import ModelInputs
from qwen2vl.cache import KVCache

ROOT = Path(__file__).resolve().parents[1]


def decode_logits(model, x: ModelInputs, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode with the model's decode path: (steps, V) logits at each step and the (steps,) chosen tokens."""
    m, t = model.model, model.config.text
    cache = KVCache(t.num_hidden_layers, 1, t.num_key_value_heads, t.head_dim, x.input_ids.shape[1] + steps,
                    m.dtype, m.device)
    positions, deltas = m.positions(x)
    key_valid = x.attention_mask.bool()
    with torch.inference_mode():
        hidden = m(m.prompt_embeddings(x), positions, key_valid, cache)
        cache.advance(x.input_ids.shape[1])
        out, tokens = [], []
        for _ in range(steps):
            logits = m.lm_head(hidden[:, -1]).float()
            out.append(logits[0])
            tokens.append(int(logits[0].argmax()))
            key_valid = torch.cat([key_valid, key_valid.new_ones(1, 1)], dim=1)
            pos = (cache.length + deltas).view(1, -1, 1).expand(3, -1, 1)
            hidden = m(m.model.embed_tokens(torch.tensor([[tokens[-1]]])), pos, key_valid, cache)
            cache.advance(1)
    return torch.stack(out), torch.tensor(tokens)


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
    exact = Qwen2VL.from_pretrained(ckpt, fast=False, progress=False)
    fast = Qwen2VL.from_pretrained(ckpt, progress=False)
    if "--outliers" in sys.argv:
        add_outlier_channels(exact)
        add_outlier_channels(fast)
        print(f"outlier channels {OUTLIER_CHANNELS} x{OUTLIER_GAIN:g} at every decoder RMSNorm")
    p = fast.plan
    print(f"fast paths (plan): kernels {p.isa}, vision {p.vision_dtype}, prefill {p.prefill_dtype}, decode {p.decode}, "
          f"head {p.head}")
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
