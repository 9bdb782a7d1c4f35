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
from .generate import ChatResult, Engine, EngineSettings, Sequence, TextDelta, VisionCache, chat_result
from .grammar import Constraint, Grammars
from .inputs.messages import VIDEO_OPTIONS, as_batch
from .model import Qwen2VLModel
from .kv import KVPool
from .processor import Processor
from .sampling import SamplingParams

class Qwen2VL:
    """A loaded Qwen2-VL model. `model` is the torch module; `config` the parsed config.json."""

    def __init__(self, model: Qwen2VLModel, processor: Processor | None = None, path: Path | None = None,
                 plan: Plan | None = None, engine: EngineSettings | None = None):
        self.model, self.plan = model, plan  # plan: the paths chosen at load (qwen2vl.cpu.Plan; `qwen2vl info`)
        self.config: Qwen2VLConfig = model.cfg
        self._processor = processor
        self.path = path
        self.defaults = SamplingParams.from_generation_config(path)  # the checkpoint's generation_config.json
        self.vision_cache = VisionCache()  # vision-encoder outputs by content, reused across calls
        # The one generator (this API, the CLI, the server, batch jobs), with its KV pool in the plan's storage.
        self.engine = Engine(model, processor.tokenizer if processor is not None else None, engine,
                             plan.kv_format if plan is not None else "float32", self.vision_cache)
        self._grammars: Grammars | None = None

    @property
    def prefix_cache(self) -> KVPool:
        """The engine's KV pool, which is also the prefix cache (blocks keyed by content, reused across calls)."""
        return self.engine.pool

    @property
    def processor(self) -> Processor:
        """The checkpoint's Processor (chat template, tokenizer, image/video preprocessing)."""
        if self._processor is None:
            raise CheckpointError(f"checkpoint {self.path} has no tokenizer.json / chat template, so no processor")
        return self._processor

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", *, fast: bool | None = None,
                        progress: bool = True, engine: EngineSettings | None = None) -> "Qwen2VL":
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
            engine: the engine's settings (qwen2vl.generate.EngineSettings: batch size, prefill chunks, the KV
                pool's bytes and storage); default EngineSettings().
        """
        model, processor, ckpt, plan = loader.load(path_or_hub_id, dtype, device, fast, progress)
        return cls(model, processor, ckpt, plan, engine)

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
        seqs = self.submit(ModelInputs.of(inputs), params)
        self.engine.run([s for s, _ in seqs])
        for _, out in seqs:
            _raise_failure(out)
        return [s.tokens for s, _ in seqs]

    def chat(self, conversation_or_batch: Any, stream: bool = False, sampling: SamplingParams | None = None,
             **kwargs: Any) -> "ChatResult | list[ChatResult] | ChatStream":
        """Answer one conversation (a ChatResult), a batch of them (a list), or stream one (`stream=True`: an
        iterator of text deltas whose `.result` is the ChatResult once it is exhausted).

        Keywords are sampling parameters (see `generate`), processor options (min_pixels, max_pixels, fps, ...) or
        one output constraint: `json_schema=` (a dict or JSON text), `regex=` or `choice=[...]`.
        """
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in VIDEO_OPTIONS}
        progress = kwargs.pop("progress", False)  # video decoding progress bars
        constraint = Constraint.of(kwargs.pop("json_schema", None), kwargs.pop("regex", None),
                                   kwargs.pop("choice", None))
        params = self.sampling(sampling, **kwargs)
        single = isinstance(conversation_or_batch, (list, tuple)) and bool(conversation_or_batch) \
            and isinstance(conversation_or_batch[0], dict)
        batch = as_batch(conversation_or_batch)
        if stream and len(batch) != 1:
            raise ValueError("stream=True takes one conversation")
        grammar = self.compile(constraint)  # before any work: a bad schema fails fast
        seqs = self.submit(self.processor(batch, progress=progress, **options), params, grammar)
        if stream:
            return ChatStream(self, *seqs[0])
        self.engine.run([s for s, _ in seqs])
        results = [self.result(s, _raise_failure(out)) for s, out in seqs]
        return results[0] if single else results

    def compile(self, constraint: Constraint | None):
        """A compiled grammar for `constraint` (None for none); InputError if it cannot be compiled."""
        if constraint is None:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self.processor.tokenizer, self.config.text.vocab_size,
                                      self.defaults.stop_token_ids)
        return self._grammars.compile(constraint)

    def submit(self, inputs: ModelInputs, params: SamplingParams, grammar=None,
               sink: Any = None) -> list[tuple[Sequence, list]]:
        """Each prompt of `inputs` to the engine as its own sequence: (sequence, the list its deltas arrive in),
        or, with `sink`, (sequence, None) and its deltas go to `sink`."""
        c = self.config
        out = []
        for i, row in enumerate(inputs.rows(c.vision.spatial_merge_size, c.image_token_id, c.video_token_id)):
            buffer = [] if sink is None else None
            matcher = self._grammars.matcher(grammar) if grammar is not None else None
            out.append((Sequence(row, params, sink or buffer.append, matcher, i), buffer))
        for seq, _ in out:
            self.engine.submit(seq)
        return out

    def result(self, seq: Sequence, deltas: list[TextDelta]) -> ChatResult:
        return chat_result(seq, deltas, self.config.image_token_id, self.config.video_token_id)

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
    """Text deltas of one answer as they are generated; `.result` (a ChatResult) once exhausted. Leaving the
    iteration early cancels the answer."""

    def __init__(self, owner: Qwen2VL, seq: Sequence, buffer: list):
        self._owner, self._seq, self._buffer = owner, seq, buffer
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str]:
        seen: list[TextDelta] = []
        try:
            while True:
                if not self._buffer:
                    if self._seq.done:
                        break
                    self._owner.engine.step()
                    continue
                item = self._buffer.pop(0)
                if isinstance(item, Exception):
                    raise item
                seen.append(item)
                if item.text:
                    yield item.text
        finally:
            self._seq.cancel()  # a no-op once it is done
        self.result = self._owner.result(self._seq, seen)


def _raise_failure(out: list) -> list:
    """A sequence's deltas, or its failure raised."""
    for item in out or ():
        if isinstance(item, Exception):
            raise item
    return out
