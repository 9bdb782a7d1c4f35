"""`qwen2vl quantize`: write an AWQ (or GPTQ) checkpoint from a BF16/FP16/FP32 one, in the official layout.

Round-to-nearest with a zero point per group of 128 input features (no activation-aware scaling). Every linear of
the text decoder is quantized; the vision tower, embeddings, norms and (tied) LM head stay 16-bit, as in
Qwen/Qwen2-VL-*-Instruct-AWQ.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..weights import canonical_name, safetensors_files
from .formats import awq_pack, gptq_pack, quantize_rtn

DECODER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
EXTRA_FILES = ["generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.json", "chat_template.jinja", "vocab.json", "merges.txt"]


def quantize_checkpoint(src: str | Path, dst: str | Path, *, method: str = "awq", bits: int = 4,
                        group_size: int = 128, dtype: torch.dtype = torch.float16, progress: bool = False) -> Path:
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise CheckpointError(f"{src} is already quantized")
    if method == "awq" and bits != 4:
        raise ValueError("AWQ checkpoints are 4-bit")
    if method not in ("awq", "gptq") or bits not in (4, 8):
        raise ValueError(f"unsupported quantization {method} {bits}-bit (awq 4; gptq 4 or 8)")
    dst.mkdir(parents=True, exist_ok=True)
    files = safetensors_files(src)
    names = [(f, key) for f in files for key in safe_open(str(f), framework="pt").keys()]
    bar = _bar(len(names), progress)
    out: dict[str, torch.Tensor] = {}
    for f, key in names:
        name = canonical_name(key)
        with safe_open(str(f), framework="pt") as handle:
            t = handle.get_tensor(key)
        if DECODER_LINEAR.match(name):
            out.update(_quantize_linear(name[: -len(".weight")], t, method, bits, group_size, dtype))
        else:
            out[name] = t.to(dtype) if t.is_floating_point() else t
        bar.update(1)
    bar.close()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})

    if method == "awq":  # exactly the keys of the official Qwen2-VL AWQ config
        qc = {"bits": 4, "group_size": group_size, "modules_to_not_convert": ["visual"], "quant_method": "awq",
              "version": "gemm", "zero_point": True}
    else:
        qc = {"bits": bits, "group_size": group_size, "desc_act": False, "sym": False, "quant_method": "gptq",
              "checkpoint_format": "gptq"}
    config["quantization_config"] = qc
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in EXTRA_FILES:
        if (src / name).exists() and src.resolve() != dst.resolve():
            shutil.copy(src / name, dst / name)
    return dst


def _quantize_linear(prefix: str, w: torch.Tensor, method: str, bits: int, group_size: int,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    q, scales, zeros = quantize_rtn(w, bits, group_size, scale_dtype=dtype)
    if method == "awq":
        qweight, qzeros = awq_pack(q, zeros)
        return {f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales.to(dtype)}
    qweight, qzeros = gptq_pack(q, zeros, bits)
    g_idx = (torch.arange(w.shape[1]) // group_size).to(torch.int32)
    return {f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales.to(dtype),
            f"{prefix}.g_idx": g_idx}


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="quantizing", unit="tensor", disable=not enabled)
