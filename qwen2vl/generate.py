"""Generation, outside the model: a vision-embedding cache and the decode loop over a KVCache.

`Generation` is the one loop the Python API, the CLI and the server consume: prefill the prompt, then one token per
row per step, with M-RoPE decode positions `sequence index + delta` per row (spec 6.4). Finished rows leave the batch
(and stop costing compute); a caller can end a row early with `stop(row)` (stop strings, a client that left).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .cache import KVCache
from .chat import TextStream, Tokenizer
from .datatypes import ModelInputs
from .grounding import Box
from .grounding import parse as parse_boxes
from .model import Qwen2VLModel
from .sampling import Sampler, SamplingParams, logprobs


class VisionCache:
    """Vision-encoder outputs keyed by a hash of each image's (or video's) pixel rows and grid; LRU by bytes."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor, grid: torch.Tensor) -> bytes:
        h = hashlib.blake2b(digest_size=32)
        h.update(str(grid.tolist()).encode() + str(pixels.dtype).encode())
        h.update(pixels.detach().cpu().contiguous().view(torch.uint8).numpy())  # zero-copy view of the bytes
        return h.digest()

    def encoder(self, model: Qwen2VLModel):
        """An `encode(pixels, grid)` for Qwen2VLModel.prompt_embeddings that runs the ViT only on unseen items."""
        merge = model.cfg.vision.spatial_merge_size ** 2

        def encode(pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            rows = grid.prod(-1).tolist()
            parts = list(torch.split(pixels, rows))
            keys = [self.key(p, g) for p, g in zip(parts, grid)]
            found = {k: self._get(k) for k in dict.fromkeys(keys)}  # each distinct item once
            todo = [keys.index(k) for k, v in found.items() if v is None]
            if todo:  # one ViT call for all misses (each still attends only within itself)
                fresh = model.encode_vision(torch.cat([parts[i] for i in todo]), grid[todo])
                for i, emb in zip(todo, torch.split(fresh, [rows[i] // merge for i in todo])):
                    found[keys[i]] = emb
                    self._put(keys[i], emb)
            return torch.cat([found[k] for k in keys])

        return encode

    def _get(self, key: bytes) -> torch.Tensor | None:
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        return None

    def _put(self, key: bytes, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.max_bytes:
            return
        self.entries[key] = emb
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


@dataclass
class StepOutput:
    """One decode step: the new token of each row still running (rows are indices into the original batch)."""
    rows: list[int]
    tokens: list[int]
    finished: dict[int, str] = field(default_factory=dict)  # row -> "stop" | "length"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Generation:
    """Iterate to decode a batch step by step. `stop(row)` ends a row before its next step."""

    def __init__(self, model: Qwen2VLModel, inputs: ModelInputs, params: list[SamplingParams],
                 vision_cache: VisionCache | None = None):
        if len(params) != inputs.input_ids.shape[0]:
            raise ValueError(f"{len(params)} sampling parameter sets for a batch of {inputs.input_ids.shape[0]}")
        self.model, self.params, self.vision_cache = model, params, vision_cache
        self.device = model.device
        self.inputs = inputs.to(self.device)
        if self.inputs.attention_mask is None:
            self.inputs.attention_mask = torch.ones_like(self.inputs.input_ids)
        self.rows = list(range(len(params)))  # original indices of the rows still running
        self.generated = [0] * len(params)
        self._stopped: dict[int, str] = {}

    def stop(self, row: int, reason: str = "stop") -> None:
        self._stopped[row] = reason

    @torch.inference_mode()
    def __iter__(self) -> Iterator[StepOutput]:
        m, x, t = self.model, self.inputs, self.model.cfg.text
        B, L = x.input_ids.shape
        capacity = L + max(p.max_new_tokens for p in self.params)
        cache = KVCache(t.num_hidden_layers, B, t.num_key_value_heads, t.head_dim, capacity,
                        m.dtype, self.device)
        prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(x.input_ids, x.attention_mask)]
        sampler = Sampler(self.params, prompt_ids, t.vocab_size, self.device)
        positions, deltas = m.positions(x)
        key_valid = x.attention_mask.bool()
        encode = self.vision_cache.encoder(m) if self.vision_cache is not None else None
        hidden = m(m.prompt_embeddings(x, encode), positions, key_valid, cache)
        cache.advance(L)
        logits = m.lm_head(hidden[:, -1]).float()  # (B, V): only the last position is needed
        want_logprobs = max((p.top_logprobs if p.logprobs else -1) for p in self.params)
        while self.rows:
            tokens = sampler(logits)
            out = StepOutput(list(self.rows), tokens.tolist())
            if want_logprobs >= 0:
                chosen, values, ids = logprobs(logits, tokens, want_logprobs)
                out.logprobs = chosen.tolist()
                out.top_logprobs = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            for i, (row, token) in enumerate(zip(self.rows, out.tokens)):
                self.generated[row] += 1
                p = self.params[row]
                if token in p.stop_token_ids and self.generated[row] > p.min_new_tokens:
                    out.finished[row] = "stop"
                elif self.generated[row] >= p.max_new_tokens:
                    out.finished[row] = "length"
            yield out
            for row, reason in self._stopped.items():  # rows the caller ended during the yield
                if row in self.rows and row not in out.finished:
                    out.finished[row] = reason
            self._stopped.clear()
            keep = [i for i, row in enumerate(self.rows) if row not in out.finished]
            if not keep:
                return
            if len(keep) < len(self.rows):  # finished rows leave the batch
                idx = torch.tensor(keep, device=self.device)
                cache.keep(idx)
                sampler.keep(idx)
                tokens, deltas, key_valid = tokens[idx], deltas[idx], key_valid[idx]
                self.rows = [self.rows[i] for i in keep]
            key_valid = torch.cat([key_valid, key_valid.new_ones(len(keep), 1)], dim=1)
            pos = (cache.length + deltas).view(1, -1, 1).expand(3, -1, 1)  # same position on all three rows
            hidden = m(m.model.embed_tokens(tokens[:, None]), pos, key_valid, cache)  # generated ids are plain text
            cache.advance(1)
            logits = m.lm_head(hidden[:, -1]).float()


# ---------------------------------------------------------------------------------------------------------------
# Text: detokenized deltas with stop strings, and finished results


@dataclass
class Usage:
    prompt_tokens: int  # every prompt token, image and video placeholders included
    completion_tokens: int
    image_tokens: int = 0
    video_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TextDelta:
    row: int
    text: str  # new text to show (never a broken character, never part of a stop string)
    token: int
    finish_reason: str | None = None  # "stop" | "length" on a row's last delta
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    boxes: list[Box] = field(default_factory=list)  # grounding boxes in the answer, in original image pixels


def stream_text(generation: Generation, tokenizer: Tokenizer) -> Iterator[TextDelta]:
    """Per-token text deltas of every row; a row whose text reaches one of its stop strings ends there."""
    streams = [TextStream(tokenizer, p.stop) for p in generation.params]
    for step in generation:
        for i, (row, token) in enumerate(zip(step.rows, step.tokens)):
            s = streams[row]
            text = s.add(token)
            finish = step.finished.get(row)
            if s.stopped and finish is None:
                finish = "stop"
                generation.stop(row)
            if finish is not None:
                text += s.finish()
            yield TextDelta(row, text, token, finish,
                            None if step.logprobs is None else step.logprobs[i],
                            None if step.top_logprobs is None else step.top_logprobs[i])


def chat_result(deltas: list[TextDelta], inputs: ModelInputs, row: int, image_token_id: int, video_token_id: int,
                with_logprobs: bool = False) -> ChatResult:
    """One row's finished answer from its deltas: the one place a ChatResult is made (API, CLI, server, batch)."""
    text = "".join(d.text for d in deltas)
    return ChatResult(
        text=text, token_ids=[d.token for d in deltas],
        boxes=parse_boxes(text, inputs.image_sizes[row] if inputs.image_sizes else None),
        finish_reason=(deltas[-1].finish_reason if deltas else None) or "length",
        usage=usage(inputs, row, len(deltas), image_token_id, video_token_id),
        logprobs=[d.logprob for d in deltas] if with_logprobs else None,
        top_logprobs=[d.top_logprobs for d in deltas] if with_logprobs and any(d.top_logprobs for d in deltas)
        else None)


def usage(inputs: ModelInputs, row: int, completion: int, image_token_id: int, video_token_id: int) -> Usage:
    ids = inputs.input_ids[row][inputs.attention_mask[row].bool()] if inputs.attention_mask is not None \
        else inputs.input_ids[row]
    return Usage(int(ids.numel()), completion, int((ids == image_token_id).sum()), int((ids == video_token_id).sum()))
