"""`Qwen2VL.from_pretrained`, in one straight sequence: resolve the checkpoint and the dtype, decide the plan, build on
the meta device with the checkpoint's quantized layers and the plan's 16-bit ones, load strictly, then swap in the
plan's layers."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Qwen2VLConfig
from .cpu import Plan, ScanHead, convert, decide, swap_after_load
from .cpu.threads import release_workers
from .cpu.vision import stream as stream_vision
from .errors import CheckpointError
from .memory import return_freed_memory, trim
from .model import Qwen2VLModel
from .processor import Processor
from .quant import QuantConfig, UpcastLinear, swap_quantized, swap_upcast
from .weights import RowReader, load_weights, resolve_checkpoint, tensor_names

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# On CPU, images that set no size are capped at 512 visual tokens (~640x640; the checkpoint allows 16384, which
# takes minutes on a CPU). A notice names each image it downscales; max_pixels (per item or call) overrides it.
CPU_IMAGE_BUDGET = 512 * 28 * 28
# Likewise videos that set no size (frames or pixels) are capped at 8192 visual tokens on CPU (a 20-minute video
# would take ~115k by qwen-vl-utils' defaults: hours of vision tower): fewer frames, smaller ones.
CPU_VIDEO_BUDGET = 8192

def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None: float32 on CPU (the plan then picks faster matmul dtypes where it measures them), bfloat16 elsewhere."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load(path_or_hub_id: str | os.PathLike, dtype: torch.dtype | str | None, device: torch.device | str,
         fast: bool | None, progress: bool) -> tuple[Qwen2VLModel, Processor | None, Path, Plan]:
    ckpt = resolve_checkpoint(path_or_hub_id)
    cfg = Qwen2VLConfig.from_file(ckpt)
    device = torch.device(device)
    if device.type == "cpu":
        return_freed_memory()
    compute = resolve_dtype(dtype, device)
    stored = DTYPES.get(str(cfg.torch_dtype))
    # A quantized checkpoint on a CPU keeps its 16-bit parts (vision tower, embeddings, tied head) 16-bit in memory.
    cpu16 = bool(cfg.quantization) and device.type == "cpu" and compute == torch.float32 and \
        stored in (torch.float16, torch.bfloat16)
    plan = decide(cfg, device, compute, fast, applies=cpu16)
    with torch.device("meta"):  # nothing is allocated until the weights are loaded
        module = Qwen2VLModel(cfg).to(compute)
        if cfg.quantization:
            swap_quantized(module, QuantConfig.from_dict(cfg.quantization), tensor_names(ckpt), compute)
        if cpu16:
            if plan.vision_dtype == compute:
                swap_upcast(module.visual, stored, compute)
            else:
                module.visual.to(plan.vision_dtype)
            swap_upcast(module.model, stored, compute)  # embed_tokens (the decoder's linears are quantized)
            module.lm_head = ScanHead(cfg.text.hidden_size, cfg.text.vocab_size, False, stored, compute,
                                      plan.kernels) if plan.head == "scan-int8" else \
                UpcastLinear(cfg.text.hidden_size, cfg.text.vocab_size, False, stored, compute)
    tied = ("lm_head.weight", "model.embed_tokens.weight") if cfg.text.tie_word_embeddings else None
    kernels = plan.kernels
    # The streamed vision blocks' weights stay in the file (cpu/vision.py StreamedLinear): never loaded.
    skip = stream_vision(module.visual, ckpt, plan.vision_streamed, plan.vision_dtype) if plan.vision_streamed else ()
    if isinstance(module.lm_head, ScanHead):
        # The fast head and the embeddings read the 16-bit table's rows from the file on demand (RowReader), so the
        # table is never loaded: its pages never count in RSS. The head's int8 copy is made from it first.
        gather = kernels.read_rows if kernels is not None else None
        head_rows = RowReader.open(ckpt, ("lm_head.weight",) + (tied[1:] if tied else ()), gather)
        embed_rows = head_rows if tied else RowReader.open(ckpt, ("model.embed_tokens.weight",), gather)
        for part, rows in ((module.lm_head, head_rows), (module.model.embed_tokens, embed_rows)):
            if rows.shape != tuple(part.weight.shape):
                raise CheckpointError(f"{rows.path.name}: a table of shape {list(rows.shape)}, the model expects "
                                      f"{list(part.weight.shape)}")
        module.lm_head.use_rows(head_rows)
        module.model.embed_tokens.use_rows(embed_rows)
        skip, tied = skip + ("lm_head.weight", "model.embed_tokens.weight"), None
    load_weights(module, ckpt, device=device, tied=tied, progress=progress, skip=skip,  # each quantized layer is
                 on_module_loaded=lambda name, m: convert(m, plan))  # converted as soon as it is loaded
    swap_after_load(module, plan)
    trim()
    release_workers()  # whichever thread generates next should own the only OpenMP pool (cpu/threads.py)
    cpu = device.type == "cpu"
    processor = Processor.from_pretrained(ckpt, image_budget=CPU_IMAGE_BUDGET if cpu else None,
                                          video_budget=CPU_VIDEO_BUDGET if cpu else None) \
        if (ckpt / "tokenizer.json").exists() else None
    return module.eval(), processor, ckpt, plan
