"""What 8-bit activations (and 8-bit vision weights) cost in accuracy, before any kernel is written: the float32
reference model (`fast=False`) with its matmul inputs rounded as an 8-bit kernel would round them (fake
quantization in float32: the rounding is the kernel's, the arithmetic exact), against the same model unrounded.
Same inputs and metric as scripts/fast_paths_accuracy.py: a 256-token text prompt and a 448x448 image plus a
question, prompt argmax agreement with the float32 logits.

Roundings of a matmul's input rows (K inputs each):
  - bf16: each value to bfloat16 (what bf16 matmuls do to activations), the yardstick;
  - int8/gG: symmetric int8 per group of G inputs (scale = group's max |x| / 127), as OpenVINO's and llama.cpp's
    dynamic quantization does;
  - +apart: LLM.int8()'s decomposition: input channels whose largest |x| in the call is over THRESHOLD x the median
    channel's are left out of the rounding and computed exactly (the rest of the row rounded without them);
  - asym: unsigned 8-bit with a zero point per group (min..max over 255 steps).
Vision weights: rounded to int8 per output channel (symmetric, per row), as OpenVINO's int8 export stores them, or
per group of 32 inputs of each row (llama.cpp's Q8_0).

Usage: python scripts/int8_study.py [--outliers]
"""

import sys
from pathlib import Path

import torch

from qwen2vl import Qwen2VL
from qwen2vl.cpu.linear import Int4Linear
from qwen2vl.datatypes import ModelInputs
from qwen2vl.quant.linear import UpcastLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_paths_accuracy import add_outlier_channels  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 6.0


def int8_sym(x: torch.Tensor, g: int) -> torch.Tensor:
    xs = x.reshape(*x.shape[:-1], -1, g)
    s = xs.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
    return ((xs / s).round().clamp(-127, 127) * s).reshape(x.shape)


def int8_asym(x: torch.Tensor, g: int) -> torch.Tensor:
    xs = x.reshape(*x.shape[:-1], -1, g)
    lo, hi = xs.amin(-1, keepdim=True), xs.amax(-1, keepdim=True)
    s = (hi - lo).clamp_min(1e-30) / 255
    return (((xs - lo) / s).round().clamp(0, 255) * s + lo).reshape(x.shape)


def apart(fn):
    """LLM.int8()-style: outlier input channels (per call) exact, the rest rounded by `fn`."""
    def rounded(x: torch.Tensor) -> torch.Tensor:
        col = x.reshape(-1, x.shape[-1]).abs().amax(0)
        out = col > THRESHOLD * col.median()
        if not out.any():
            return fn(x)
        kept = x[..., out]
        y = fn(x.masked_fill(out, 0.0))
        y[..., out] = kept
        return y
    return rounded


ROUNDINGS = {
    "float32": lambda x: x,
    "bf16": lambda x: x.bfloat16().float(),
    "int8/g32": lambda x: int8_sym(x, 32),
    "int8/g32 +apart": apart(lambda x: int8_sym(x, 32)),
    "int8/g16 +apart": apart(lambda x: int8_sym(x, 16)),
    "int8/g8 +apart": apart(lambda x: int8_sym(x, 8)),
    "asym/g32 +apart": apart(lambda x: int8_asym(x, 32)),
    "int8/row +apart": apart(lambda x: int8_sym(x, x.shape[-1])),
}


class Rounding:
    """Forward pre-hooks rounding the inputs of the decoder's quantized linears (`text`) and of the vision tower's
    linears (`vision`), and optionally the vision weights to int8 per output channel (w8="row") or per 32 inputs
    (w8="g32")."""

    def __init__(self, model):
        self.m = model.model
        self.text = [mod for mod in self.m.model.modules() if isinstance(mod, Int4Linear)]
        self.vision = [mod for mod in self.m.visual.modules() if isinstance(mod, (UpcastLinear, torch.nn.Linear))]
        self.hooks, self.saved = [], []

    def set(self, text: str, vision: str, w8: str | None) -> None:
        self.clear()
        for mods, name in ((self.text, text), (self.vision, vision)):
            fn = ROUNDINGS[name]
            for mod in mods:
                self.hooks.append(mod.register_forward_pre_hook(lambda _m, a, fn=fn: (fn(a[0].float()),)))
        if w8:
            for mod in self.vision:
                w = mod.weight  # replaced by a float32 copy: the rounded values exactly, not rounded again to 16 bits
                self.saved.append((mod, w))
                mod.weight = torch.nn.Parameter(int8_sym(w.float(), w.shape[1] if w8 == "row" else 32),
                                                requires_grad=False)

    def clear(self) -> None:
        for h in self.hooks:
            h.remove()
        for mod, w in self.saved:
            mod.weight = w
        self.hooks, self.saved = [], []


def main() -> None:
    ckpt = ROOT / "checkpoints" / "qwen2-vl-2b-instruct-random-awq"
    model = Qwen2VL.from_pretrained(ckpt, fast=False, progress=False)
    if "--outliers" in sys.argv:
        add_outlier_channels(model)
        print("outlier channels at every decoder RMSNorm (scripts/fast_paths_accuracy.py --outliers)")
    image = ROOT.parent / "shared" / "assets" / "images" / "astronaut.png"
    ids = torch.randint(1000, 100000, (1, 256), generator=torch.Generator().manual_seed(0))
    text = ModelInputs(ids, torch.ones_like(ids))
    img = model.processor([[{"role": "user", "content": [
        {"type": "image", "image": str(image), "resized_height": 448, "resized_width": 448},
        {"type": "text", "text": "Describe this image."}]}]])
    r = Rounding(model)
    with torch.inference_mode():
        ref = {"text": model.logits(text)[0], "image": model.logits(img)[0]}

        def agree(name, x):
            got = model.logits(x)[0]
            return (got.argmax(-1) == ref[name].argmax(-1)).float().mean().item()

        print("| decoder matmul inputs | text 256 argmax | image 448 argmax (vision float32) |")
        print("|---|---|---|")
        for name in ROUNDINGS:
            if name == "float32":
                continue
            r.set(name, "float32", None)
            print(f"| {name} | {agree('text', text):.3f} | {agree('image', img):.3f} |", flush=True)
        print("\n| vision linears (decoder float32) | image 448 argmax |")
        print("|---|---|")
        weights = {None: "", "row": "int8 weights per channel, ", "g32": "int8 weights per 32 inputs, "}
        for name, w8 in (("bf16", None), ("int8/g32", None), ("int8/g32 +apart", None), ("asym/g32 +apart", None),
                         ("int8/row +apart", None), ("float32", "row"), ("int8/row +apart", "row"),
                         ("float32", "g32"), ("int8/row +apart", "g32")):
            r.set("float32", name, w8)
            print(f"| {weights[w8]}{name} inputs | {agree('image', img):.3f} |", flush=True)
        r.clear()


if __name__ == "__main__":
    main()
