"""What bf16 costs the reference itself: transformers in bfloat16 (how the Qwen2-VL model card runs it) against
transformers in float32, on the random-weight 2B BF16 checkpoint, for the same inputs as
scripts/fast_paths_accuracy.py (a 256-token text prompt; a 448x448 image plus a question). A yardstick for the
fast paths' numbers in BENCHMARKS.md. With --outliers, both models get fast_paths_accuracy.py's outlier channels (the
decoder's RMSNorm weights scaled up on a few channels).
Usage: python scripts/bf16_yardstick.py [bf16 checkpoint] [--outliers]
  (default checkpoint: checkpoints/qwen2-vl-2b-instruct-random-bf16)
"""

import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_paths_accuracy import OUTLIER_CHANNELS, OUTLIER_GAIN  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def add_outlier_channels(model) -> None:
    """As fast_paths_accuracy.add_outlier_channels, on transformers' module names."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[OUTLIER_CHANNELS] *= OUTLIER_GAIN


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    outliers = "--outliers" in sys.argv
    ckpt = Path(args[0]) if args else ROOT / "checkpoints" / "qwen2-vl-2b-instruct-random-bf16"
    proc = Qwen2VLProcessor.from_pretrained(ckpt)
    image = Image.open(ROOT.parent / "shared" / "assets" / "images" / "astronaut.png").convert("RGB")
    ids = torch.randint(1000, 100000, (1, 256), generator=torch.Generator().manual_seed(0))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    cases = {"text 256 tokens": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
             "448x448 image + question": dict(proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)],
                                                   images=[image.resize((448, 448))], return_tensors="pt"))}
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").eval()
        if outliers:
            add_outlier_channels(model)
        with torch.inference_mode():
            logits[dtype] = {name: model(**x).logits[0].float() for name, x in cases.items()}
        del model
    if outliers:
        print(f"outlier channels {OUTLIER_CHANNELS} x{OUTLIER_GAIN:g} at every decoder RMSNorm")
    print("| input | transformers bf16 vs fp32: max abs diff (scale) | argmax agreement |")
    print("|---|---|---|")
    for name in cases:
        ref, got = logits[torch.float32][name], logits[torch.bfloat16][name]
        print(f"| {name} | {(got - ref).abs().max().item():.3g} ({ref.abs().max().item():.2f}) | "
              f"{(got.argmax(-1) == ref.argmax(-1)).float().mean().item():.3f} |")


if __name__ == "__main__":
    main()
