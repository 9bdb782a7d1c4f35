"""What bf16 costs the reference itself: transformers in bfloat16 (how the Qwen2-VL model card runs it) against
transformers in float32, on the random-weight 2B BF16 checkpoint, for the same inputs as
scripts/fast_paths_accuracy.py (a 256-token text prompt; a 448x448 image plus a question). A yardstick for the
fast paths' numbers in BENCHMARKS.md.
Usage: python scripts/bf16_yardstick.py [bf16 checkpoint]  (default: checkpoints/qwen2-vl-2b-instruct-random-bf16)
"""

import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ckpt = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "checkpoints" / "qwen2-vl-2b-instruct-random-bf16"
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
        with torch.inference_mode():
            logits[dtype] = {name: model(**x).logits[0].float() for name, x in cases.items()}
        del model
    print("| input | transformers bf16 vs fp32: max abs diff (scale) | argmax agreement |")
    print("|---|---|---|")
    for name in cases:
        ref, got = logits[torch.float32][name], logits[torch.bfloat16][name]
        print(f"| {name} | {(got - ref).abs().max().item():.3g} ({ref.abs().max().item():.2f}) | "
              f"{(got.argmax(-1) == ref.argmax(-1)).float().mean().item():.3f} |")


if __name__ == "__main__":
    main()
