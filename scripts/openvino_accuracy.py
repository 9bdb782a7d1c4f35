"""How accurate OpenVINO's default CPU arithmetic is on an exported Qwen2-VL, against OpenVINO's own exact float32
arithmetic on the same int4 weights, with the project's metric: prompt argmax agreement (the fraction of prompt
positions where the argmax of the logits equals the reference's), plus the largest absolute logit difference.

OpenVINO's CPU plugin by default runs in bf16 where the CPU has bf16 instructions (INFERENCE_PRECISION_HINT), quantizes
activations dynamically to int8 in groups of 32 for the compressed matmuls (DYNAMIC_QUANTIZATION_GROUP_SIZE) and stores
the KV cache as u8 (KV_CACHE_PRECISION). The reference compiles the same IR with f32 / 0 / f32 instead. Each config
loads the model through optimum-intel's OVModelForVisualCausalLM (the exported language model returns logits for every
position) and runs one prefill over:
  - text: the 256 token ids of scripts/fast_paths_accuracy.py (torch.randint(1000, 100000, (1, 256)), seed 0);
  - image: ../shared/assets/images/astronaut.png resized to 448x448 plus "Describe this image." in the chat template.
Every compiled submodel's precision properties are printed, so one can see that each config took effect.

Run in the venv that ../shared/tools/openvino-anchor.sh makes (2 threads; --ablate adds the default config with
one knob at a time switched to exact):

  ~/.cache/qwen2vl-openvino/venv/bin/python scripts/openvino_accuracy.py [MODEL_DIR] [--threads=2] [--ablate]

MODEL_DIR defaults to ~/.cache/qwen2vl-openvino/qwen2-vl-2b-instruct-random-bf16-int4. For the outlier-channel variant
(decoder RMSNorm weights x30 on channels 17, 404, 931, 1290, as in scripts/fast_paths_accuracy.py --outliers), write a
modified checkpoint, export it as the anchor does, and measure it:

  VENV=~/.cache/qwen2vl-openvino/venv
  $VENV/bin/python scripts/openvino_accuracy.py --make-outliers checkpoints/qwen2-vl-2b-instruct-random-bf16 \
      /tmp/ov-outliers/ckpt
  $VENV/bin/optimum-cli export openvino --model /tmp/ov-outliers/ckpt --task image-text-to-text --weight-format int4 \
      /tmp/ov-outliers/int4
  $VENV/bin/python scripts/openvino_accuracy.py /tmp/ov-outliers/int4
"""
import gc
import os
import sys
from pathlib import Path

import openvino as ov
import torch
from PIL import Image

OUTLIER_CHANNELS, OUTLIER_GAIN = [17, 404, 931, 1290], 30.0  # fast_paths_accuracy.py's (no qwen2vl in this venv)
IMAGE = Path(__file__).resolve().parents[2] / "shared" / "assets" / "images" / "astronaut.png"
EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0", "KV_CACHE_PRECISION": "f32"}
ABLATIONS = {"default, dynamic quantization off": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
             "default, f32 precision": {"INFERENCE_PRECISION_HINT": "f32"},
             "default, f32 KV cache": {"KV_CACHE_PRECISION": "f32"}}
PROPERTIES = ["INFERENCE_PRECISION_HINT", "DYNAMIC_QUANTIZATION_GROUP_SIZE", "KV_CACHE_PRECISION",
              "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION", "INFERENCE_NUM_THREADS"]


def make_outliers(src: Path, dst: Path) -> None:
    """Copy checkpoint `src` to `dst` (unchanged files symlinked) with every decoder RMSNorm weight scaled by
    OUTLIER_GAIN on OUTLIER_CHANNELS, saved in the original dtype."""
    from safetensors.torch import load_file, save_file
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    changed = 0
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(f)
        for name, t in tensors.items():
            if ".layers." in name and name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) \
                    and "visual" not in name:
                t[OUTLIER_CHANNELS] = (t[OUTLIER_CHANNELS].float() * OUTLIER_GAIN).to(t.dtype)
                changed += 1
        save_file(tensors, dst / f.name, metadata={"format": "pt"})
    print(f"{changed} RMSNorm weights scaled x{OUTLIER_GAIN:g} on channels {OUTLIER_CHANNELS}; wrote {dst}")


def cases(processor) -> dict:
    ids = torch.randint(1000, 100000, (1, 256), generator=torch.Generator().manual_seed(0))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.open(IMAGE).convert("RGB").resize((448, 448))
    return {"text 256 tokens": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            "448x448 image + question": dict(processor(text=[prompt], images=[image], return_tensors="pt"))}


def compiled_models(model):
    """(name, ov.CompiledModel) for every compiled submodel of an OVModelForVisualCausalLM."""
    for name, part in model.components.items():
        for attr in ("request", "text_emb_request"):
            obj = getattr(part, attr, None)
            if isinstance(obj, ov.InferRequest):
                obj = obj.get_compiled_model()
            if obj is not None:
                yield f"{name}.{attr}", obj


def prompt_logits(model, x: dict) -> torch.Tensor:
    """float32 logits (L, vocab) for every prompt position, from one prefill on an empty KV state."""
    n = x["input_ids"].shape[1]
    model.rope_deltas = None  # optimum caches M-RoPE deltas across calls; recompute them for this prompt
    with torch.no_grad():
        out = model(**x, cache_position=torch.arange(n))  # past_key_values None: the request's state is reset
    logits = out.logits[0].float().clone()
    assert logits.shape[0] == n, f"logits for {logits.shape[0]} of {n} positions"
    return logits


def main() -> None:
    from optimum.intel import OVModelForVisualCausalLM
    from transformers import AutoProcessor
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--make-outliers" in sys.argv:
        return make_outliers(Path(args[0]), Path(args[1]))
    model_dir = Path(args[0]) if args else Path.home() / ".cache/qwen2vl-openvino/qwen2-vl-2b-instruct-random-bf16-int4"
    threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "2")
    print(f"{model_dir}: openvino {ov.__version__}, CPU {ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')}")
    inputs = cases(AutoProcessor.from_pretrained(model_dir))
    configs = {"default": {}, **(ABLATIONS if "--ablate" in sys.argv else {}), "exact f32": EXACT}
    logits = {}
    for cname, cfg in configs.items():
        model = OVModelForVisualCausalLM.from_pretrained(model_dir, device="CPU",
                                                         ov_config={"INFERENCE_NUM_THREADS": threads, **cfg})
        print(f"config {cname}: {cfg}")
        for name, cm in compiled_models(model):
            props = ", ".join(f"{p}={cm.get_property(p)}" for p in PROPERTIES)
            print(f"  {name}: {props}")
        logits[cname] = {iname: prompt_logits(model, x) for iname, x in inputs.items()}
        del model
        gc.collect()
    print("\n| model | input | OpenVINO config vs its f32 | prompt argmax agreement | max abs diff (scale) |")
    print("|---|---|---|---|---|")
    for cname in configs:
        if cname == "exact f32":
            continue
        for iname in inputs:
            ref, got = logits["exact f32"][iname], logits[cname][iname]
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            diff, scale = (got - ref).abs().max().item(), ref.abs().max().item()
            print(f"| {model_dir.name} | {iname} ({ref.shape[0]} positions) | {cname} | {agree:.3f} | "
                  f"{diff:.3g} ({scale:.2f}) |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
