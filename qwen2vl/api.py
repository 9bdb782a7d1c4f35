"""The public entry point: `Qwen2VL.from_pretrained(path_or_hub_id, dtype=None, device="cpu")`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import Qwen2VLConfig
from .datatypes import ModelInputs
from .errors import CheckpointError
from .model import Qwen2VLModel
from .processor import Processor
from .weights import load_weights, resolve_checkpoint

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None: float32 on CPU (bf16/fp16 matmuls are ~100x slower there), bfloat16 on accelerators."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class Qwen2VL:
    """A loaded Qwen2-VL model. `model` is the torch module; `config` the parsed config.json."""

    def __init__(self, model: Qwen2VLModel, processor: Processor | None = None, path: Path | None = None):
        self.model = model
        self.config: Qwen2VLConfig = model.cfg
        self._processor = processor
        self.path = path

    @property
    def processor(self) -> Processor:
        """The checkpoint's Processor (chat template, tokenizer, image/video preprocessing)."""
        if self._processor is None:
            raise CheckpointError(f"checkpoint {self.path} has no tokenizer.json / chat template, so no processor")
        return self._processor

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", *, progress: bool = True) -> "Qwen2VL":
        """Load a checkpoint directory or a hub id (e.g. "Qwen/Qwen2-VL-2B-Instruct"), strictly.

        Args:
            path_or_hub_id: a local directory with config.json and *.safetensors, or a hub id (downloaded and cached
                by huggingface_hub).
            dtype: compute and storage dtype of the weights; default float32 on CPU, bfloat16 elsewhere.
            device: "cpu", "cuda", "cuda:1", ...
        """
        ckpt = resolve_checkpoint(path_or_hub_id)
        cfg = Qwen2VLConfig.from_file(ckpt)
        if cfg.quantization:
            raise CheckpointError(f"{ckpt} is a quantized checkpoint ({cfg.quantization.get('quant_method')}); "
                                  "this version of qwen2vl loads only unquantized (BF16/FP16/FP32) checkpoints")
        device = torch.device(device)
        with torch.device("meta"):
            module = Qwen2VLModel(cfg)
        tied = ("lm_head.weight", "model.embed_tokens.weight") if cfg.text.tie_word_embeddings else None
        load_weights(module, ckpt, dtype=resolve_dtype(dtype, device), device=device, tied=tied, progress=progress)
        processor = Processor.from_pretrained(ckpt) if (ckpt / "tokenizer.json").exists() else None
        return cls(module.eval(), processor, ckpt)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def logits(self, inputs: Any) -> torch.Tensor:
        """float32 logits (B, L, vocab) over the whole prompt.

        `inputs` has the fields of transformers' Qwen2VLProcessor output (input_ids, attention_mask, pixel_values,
        image_grid_thw, pixel_values_videos, video_grid_thw), as a mapping or an object.
        """
        return self.model.logits(ModelInputs.of(inputs))
