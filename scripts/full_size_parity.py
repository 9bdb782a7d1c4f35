"""Full-size parity check (not part of the test suite: ~10 GB of RAM and a few minutes).

Builds (or reuses) a random-weight checkpoint with the real Qwen2-VL-2B-Instruct config, tokenizer and chat template
from ../shared/assets/qwen2-vl-2b-instruct, stored in bfloat16 as the official files are. Then runs transformers
(float32) and qwen2vl (float32) on the same prompt with a 448x448 image and compares the logits.

    .venv/bin/python scripts/full_size_parity.py [--checkpoint DIR] [--image PATH] [--atol 1e-3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("QWEN2VL_ASSETS", ROOT.parent / "shared" / "assets"))
CHECKPOINT_FILES = ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.json"]


def build_random_checkpoint(out: Path, source: Path, seed: int = 0) -> Path:
    """A hub-layout checkpoint (flat config.json, legacy tensor names, bf16) with transformers' random init."""
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    flat = json.loads((source / "config.json").read_text())
    torch.manual_seed(seed)
    t0 = time.time()
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**flat)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    for name in CHECKPOINT_FILES:  # the real files, so the checkpoint looks like the hub's
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    print(f"built random checkpoint {out} in {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "qwen2-vl-2b-instruct-random-bf16")
    ap.add_argument("--image", type=Path, default=ASSETS / "images" / "astronaut.png")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--atol", type=float, default=1e-3)
    args = ap.parse_args()

    from PIL import Image
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    from qwen2vl import Qwen2VL

    ckpt = build_random_checkpoint(args.checkpoint, ASSETS / "qwen2-vl-2b-instruct")
    processor = Qwen2VLProcessor.from_pretrained(ckpt)
    image = Image.open(args.image).convert("RGB").resize((args.size, args.size), Image.BICUBIC)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, image grid {inputs['image_grid_thw'].tolist()}")

    t0 = time.time()
    hf = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**inputs).logits.float()
    t_hf = time.time() - t0
    del hf
    gc.collect()

    t0 = time.time()
    ours = Qwen2VL.from_pretrained(ckpt, dtype=torch.float32)
    got = ours.logits({k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
    t_ours = time.time() - t0

    diff = (got - ref).abs()
    same_argmax = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"transformers: load+forward {t_hf:.1f} s; qwen2vl: load+forward {t_ours:.1f} s")
    print(f"logits: max |ref| {ref.abs().max():.4f}, max |diff| {diff.max():.3e}, mean |diff| {diff.mean():.3e}, "
          f"argmax agreement {same_argmax:.4f}")
    ok = diff.max().item() <= args.atol
    print("PASS" if ok else "FAIL", f"(atol {args.atol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
