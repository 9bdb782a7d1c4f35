"""The public entry point: `Qwen2VL.from_pretrained(path_or_hub_id, dtype=None, device="cpu")`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch

from . import grounding, loader
from .config import Qwen2VLConfig
from .cpu import Plan
from .datatypes import ModelInputs
from .errors import CheckpointError
from .generate import ChatResult, Generation, TextDelta, VisionCache, chat_result, stream_text
from .inputs.messages import VIDEO_OPTIONS, as_batch
from .model import Qwen2VLModel
from .processor import Processor
from .sampling import SamplingParams

class Qwen2VL:
    """A loaded Qwen2-VL model. `model` is the torch module; `config` the parsed config.json."""

    def __init__(self, model: Qwen2VLModel, processor: Processor | None = None, path: Path | None = None,
                 plan: Plan | None = None):
        self.model, self.plan = model, plan  # plan: the paths chosen at load (qwen2vl.cpu.Plan; `qwen2vl info`)
        self.config: Qwen2VLConfig = model.cfg
        self._processor = processor
        self.path = path
        self.defaults = SamplingParams.from_generation_config(path)  # the checkpoint's generation_config.json
        self.vision_cache = VisionCache()  # vision-encoder outputs by content, reused across calls

    @property
    def processor(self) -> Processor:
        """The checkpoint's Processor (chat template, tokenizer, image/video preprocessing)."""
        if self._processor is None:
            raise CheckpointError(f"checkpoint {self.path} has no tokenizer.json / chat template, so no processor")
        return self._processor

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", *, fast: bool | None = None,
                        progress: bool = True) -> "Qwen2VL":
        """Load a checkpoint directory or a hub id (e.g. "Qwen/Qwen2-VL-2B-Instruct"), strictly.

        Args:
            path_or_hub_id: a local directory with config.json and *.safetensors, or a hub id (downloaded and cached
                by huggingface_hub).
            dtype: the compute dtype (and storage dtype of unquantized weights); default float32 on CPU, bfloat16
                elsewhere. A quantized checkpoint's weights keep their own storage (see qwen2vl.quant).
            device: "cpu", "cuda", "cuda:1", ...
            fast: a quantized checkpoint on CPU (default: on) takes the fast paths the load plan measures on this
                machine (qwen2vl.cpu.plan; `qwen2vl info` prints it) and whose accuracy BENCHMARKS.md states: the LM
                head scans an int8 copy and recomputes its best candidates exactly (greedy choices stay exact), the
                vision encoder and prefill matmuls run in bf16 where bf16 measures faster than float32, and decoding
                one sequence runs each decoder layer in one native call. False keeps every matmul in float32 and
                every op to float32 rounding (quantized decode matmuls round activations to int16 per 128 inputs).
        """
        model, processor, ckpt, plan = loader.load(path_or_hub_id, dtype, device, fast, progress)
        return cls(model, processor, ckpt, plan)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype."""
        return self.model.dtype

    def logits(self, inputs: Any) -> torch.Tensor:
        """float32 logits (B, L, vocab) over the whole prompt.

        `inputs` has the fields of transformers' Qwen2VLProcessor output (input_ids, attention_mask, pixel_values,
        image_grid_thw, pixel_values_videos, video_grid_thw), as a mapping or an object.
        """
        return self.model.logits(ModelInputs.of(inputs))

    def sampling(self, params: SamplingParams | None = None, **overrides: Any) -> SamplingParams:
        """The checkpoint's defaults with `params` and keyword overrides applied."""
        return self.defaults.updated(params, **overrides)

    def generate(self, inputs: Any, max_new_tokens: int | None = None, sampling: SamplingParams | None = None,
                 **kwargs: Any) -> list[list[int]]:
        """New token ids of every prompt in `inputs` (the eos token included when generation stopped on it).

        Sampling keywords: temperature (0 = greedy), top_p, top_k, min_p, repetition_penalty, presence_penalty,
        frequency_penalty, seed, stop, stop_token_ids, min_new_tokens; or a SamplingParams as `sampling`.
        """
        params = self.sampling(sampling, max_new_tokens=max_new_tokens, **kwargs)
        x = ModelInputs.of(inputs)
        generation = Generation(self.model, x, [params] * x.input_ids.shape[0], self.vision_cache)
        out: list[list[int]] = [[] for _ in range(x.input_ids.shape[0])]
        steps = stream_text(generation, self.processor.tokenizer) if params.stop else generation
        for step in steps:
            if isinstance(step, TextDelta):
                out[step.row].append(step.token)
            else:
                for row, token in zip(step.rows, step.tokens):
                    out[row].append(token)
        return out

    def chat(self, conversation_or_batch: Any, stream: bool = False, sampling: SamplingParams | None = None,
             **kwargs: Any) -> "ChatResult | list[ChatResult] | ChatStream":
        """Answer one conversation (a ChatResult), a batch of them (a list), or stream one (`stream=True`: an
        iterator of text deltas whose `.result` is the ChatResult once it is exhausted).

        Keywords are sampling parameters (see `generate`) or processor options (min_pixels, max_pixels, fps, ...).
        """
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in VIDEO_OPTIONS}
        progress = kwargs.pop("progress", False)  # video decoding progress bars
        params = self.sampling(sampling, **kwargs)
        single = isinstance(conversation_or_batch, (list, tuple)) and bool(conversation_or_batch) \
            and isinstance(conversation_or_batch[0], dict)
        batch = as_batch(conversation_or_batch)
        if stream and len(batch) != 1:
            raise ValueError("stream=True takes one conversation")
        inputs = self.processor(batch, progress=progress, **options)
        generation = Generation(self.model, inputs, [params] * len(batch), self.vision_cache)
        deltas = stream_text(generation, self.processor.tokenizer)
        if stream:
            return ChatStream(deltas, inputs, self.config, params)
        results = _collect(deltas, inputs, self.config, params, len(batch))
        return results[0] if single else results


    def ground(self, image: Any, phrase: str, **kwargs: Any) -> list[grounding.Box]:
        """Boxes (original image pixels) of what `phrase` refers to in `image`, asked the way Qwen2-VL's grounding
        data asks (Find <|object_ref_start|>phrase<|object_ref_end|>). Keywords as for `chat`."""
        conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": grounding.prompt(phrase)}]}]
        boxes = self.chat(conversation, **kwargs).boxes
        for b in boxes:
            b.label = b.label or phrase
        return boxes


class ChatStream:
    """Text deltas of one answer as they are generated; `.result` (a ChatResult) once exhausted."""

    def __init__(self, deltas: Iterator[TextDelta], inputs: ModelInputs, config: Qwen2VLConfig,
                 params: SamplingParams):
        self._deltas, self._inputs, self._config, self._params = deltas, inputs, config, params
        self._parts: list[TextDelta] = []
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str]:
        for d in self._deltas:
            self._parts.append(d)
            if d.text:
                yield d.text
        self.result = _result(self._parts, self._inputs, self._config, self._params, 0)


def _collect(deltas: Iterator[TextDelta], inputs: ModelInputs, config: Qwen2VLConfig, params: SamplingParams,
             n: int) -> list[ChatResult]:
    parts: list[list[TextDelta]] = [[] for _ in range(n)]
    for d in deltas:
        parts[d.row].append(d)
    return [_result(p, inputs, config, params, row) for row, p in enumerate(parts)]


def _result(parts: list[TextDelta], inputs: ModelInputs, config: Qwen2VLConfig, params: SamplingParams,
            row: int) -> ChatResult:
    return chat_result(parts, inputs, row, config.image_token_id, config.video_token_id, bool(params.logprobs))
