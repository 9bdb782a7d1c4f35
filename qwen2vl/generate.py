"""Generation, outside the model: the Engine that answers many sequences at once, and its caches.

The Python API, the CLI, the server and batch jobs all submit Sequences to an Engine. Each step:
- admits a waiting sequence: its prompt starts after the longest prefix the PrefixCache holds, and the vision
  encoder runs only on images with tokens after that prefix (the VisionCache skips the ones it has seen);
- prefills one chunk of it on its own (chunks are short while others decode, so one long prompt does not stall
  everyone's tokens), and once its prompt is done, picks its first token and joins the running batch;
- decodes one token for every running row. The batch's keys and values sit right-aligned in one KVCache (left
  padding is masked), so a step is one forward; M-RoPE decode positions are per row (spec 6.4).
A row leaves when it stops (stop token, stop string, length, a complete grammar) or is cancelled; its prompt and
answer go to the prefix cache for the next turn.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cache import KVCache
from .chat import TextStream, Tokenizer
from .datatypes import MediaItem, ModelInputs
from .grammar import Matcher, mask_logits
from .grounding import Box
from .grounding import parse as parse_boxes
from .model import Qwen2VLModel
from .prefix import PrefixCache, content_key
from .sampling import Sampler, SamplingParams, logprobs


class VisionCache:
    """Vision-encoder outputs keyed by a hash of each image's (or video's) pixel rows and grid; LRU by bytes."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    key = staticmethod(content_key)

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



# ---------------------------------------------------------------------------------------------------------------
# Sequences and the engine


@dataclass
class Usage:
    prompt_tokens: int  # every prompt token, image and video placeholders included
    completion_tokens: int
    image_tokens: int = 0
    video_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TextDelta:
    row: int  # the sequence's index among those its caller submitted together
    text: str  # new text to show (never a broken character, never part of a stop string)
    token: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" on a sequence's last delta
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sequence:
    """One prompt (a single-row ModelInputs, no padding) being answered. The engine sends `sink` each TextDelta,
    the last with a finish_reason, or an Exception if the sequence failed. `cancel()` ends it at the next step."""

    def __init__(self, inputs: ModelInputs, params: SamplingParams, sink: Callable[[object], None],
                 matcher: Matcher | None = None, row: int = 0):
        if inputs.input_ids.shape[0] != 1:
            raise ValueError("a Sequence is one prompt (ModelInputs.rows splits a batch)")
        self.inputs, self.params, self.sink, self.matcher, self.row = inputs, params, sink, matcher, row
        self.ids: list[int] = inputs.input_ids[0].tolist()
        self.tokens: list[int] = []  # generated so far
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.stream: TextStream | None = None
        self.media: list[tuple[int, int, bytes]] = []  # (start, end, content key) of each image / video
        self.submitted, self.last_token_at = time.perf_counter(), None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def usage(self, image_token_id: int, video_token_id: int) -> Usage:
        ids = self.inputs.input_ids[0]
        return Usage(len(self.ids), len(self.tokens), int((ids == image_token_id).sum()),
                     int((ids == video_token_id).sum()), self.cached_tokens)


@dataclass
class _Prefill:
    """A sequence whose prompt is being prefilled on its own, `done` tokens so far."""
    seq: Sequence
    kv: KVCache
    embeds: torch.Tensor  # (1, L - cached, D): the prompt's embeddings after the cached prefix
    positions: torch.Tensor  # (3, 1, L)
    delta: int  # M-RoPE: a token appended at index i has position i + delta
    cached: int
    done: int
    keys: list[bytes]  # prefix-cache keys of the prompt's full blocks


class Observer:
    """What an engine reports (the server's metrics implement it); these defaults ignore it."""

    def prompt(self, tokens: int, cached: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...


class Engine:
    """Continuous batching over one model. Thread-safe: any thread may `submit`, and `step` runs under a lock, so
    the API's calls and a server's loop can share one engine (and its caches)."""

    def __init__(self, model: Qwen2VLModel, tokenizer: Tokenizer | None, vision_cache: VisionCache | None = None,
                 prefix_cache: PrefixCache | None = None, max_batch: int = 16, chunk: int = 256,
                 observer: Observer | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.vision_cache, self.prefix_cache = vision_cache, prefix_cache
        self.max_batch, self.chunk, self.observer = max_batch, chunk, observer or Observer()
        self.lock = threading.RLock()
        self.work = threading.Condition(self.lock)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: _Prefill | None = None
        self.rows: list[Sequence] = []  # the running batch, in cache row order
        self.cache: KVCache | None = None
        self.prefill_tokens = 0  # prompt tokens computed (not taken from the prefix cache), over all sequences
        self.decode_steps = 0

    # -- the caller's side

    def submit(self, seq: Sequence) -> Sequence:
        if self.tokenizer is not None:
            seq.stream = TextStream(self.tokenizer, seq.params.stop)
        with self.work:
            self.waiting.append(seq)
            self.work.notify_all()
        return seq

    def cancel_all(self) -> None:
        """Cancel every sequence, waiting or running (a server shutting down): each ends at the next step."""
        with self.lock:
            for seq in [*self.waiting, *self.rows, *([self.prefilling.seq] if self.prefilling else [])]:
                seq.cancel()
            self.work.notify_all()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.rows)

    def run(self, seqs: list[Sequence]) -> None:
        """Step until every one of `seqs` is done."""
        while not all(s.done for s in seqs):
            self.step()

    def serve_forever(self, stop: threading.Event) -> None:
        """Step whenever there is work, until `stop` is set (a server's engine thread)."""
        while not stop.is_set():
            with self.work:
                if not self.busy:
                    self.work.wait(0.1)
                    continue
            self.step()

    # -- one step

    @torch.inference_mode()
    def step(self) -> None:
        with self.lock:
            while self.waiting and self.waiting[0].cancelled:
                self._finish(self.waiting.popleft(), "abort")
            if self.prefilling is None and self.waiting and len(self.rows) < self.max_batch:
                seq = self.waiting.popleft()
                self.prefilling = self._guard([seq], lambda: self._start(seq))
            if self.prefilling is not None:
                p = self.prefilling
                self._guard([p.seq], lambda: self._prefill(p))
            if self.rows:
                self._guard(list(self.rows), self._decode)

    def _guard(self, seqs: list[Sequence], work: Callable):
        """Run one piece of work; if it fails, only the sequences it serves fail (with the exception)."""
        try:
            return work()
        except Exception as e:  # noqa: BLE001 - reported to each caller; the engine goes on
            for s in seqs:
                self._fail(s, e)
            if self.prefilling is not None and self.prefilling.seq in seqs:
                self.prefilling = None
            if any(s in self.rows for s in seqs):
                self.rows, self.cache = [], None
            return None

    def _start(self, seq: Sequence) -> _Prefill:
        m, t = self.model, self.model.cfg.text
        x = seq.inputs.to(m.device)
        merge = m.cfg.vision.spatial_merge_size
        items: list[MediaItem] = x.media(merge, m.cfg.image_token_id, m.cfg.video_token_id)
        positions, deltas = m.positions(x)
        L = len(seq.ids)
        cached, keys, k, v = 0, [], None, None
        if self.prefix_cache is not None:
            seq.media = [(i.start, i.end, content_key(i.pixels, i.grid)) for i in items]
            keys = self.prefix_cache.keys(seq.ids, seq.media)
            cached, k, v = self.prefix_cache.lookup(keys, L - 1)  # the last token is always computed (its logits)
        kv = KVCache(t.num_hidden_layers, 1, t.num_key_value_heads, t.head_dim,
                     L + min(seq.params.max_new_tokens, 256), m.dtype, m.device)
        if cached:
            kv.k[:, 0, :, :cached], kv.v[:, 0, :, :cached] = k, v
            kv.length = cached
        seq.cached_tokens = cached
        self.observer.prompt(L, cached)
        encode = self.vision_cache.encoder(m) if self.vision_cache is not None else None
        embeds = m.embeddings_from(x, items, cached, encode)
        return _Prefill(seq, kv, embeds, positions, int(deltas[0]), cached, cached, keys)

    def _prefill(self, p: _Prefill) -> None:
        m, L = self.model, len(p.seq.ids)
        if p.seq.cancelled:
            self.prefilling = None
            return self._finish(p.seq, "abort")
        n = min(L - p.done, self.chunk if self.rows else L)  # alone, the whole rest in one go
        lo = p.done - p.cached
        key_valid = torch.ones(1, p.done + n, dtype=torch.bool, device=m.device)
        hidden = m(p.embeds[:, lo:lo + n], p.positions[:, :, p.done:p.done + n], key_valid, p.kv)
        p.kv.advance(n)
        p.done += n
        self.prefill_tokens += n
        if p.done < L:
            return
        self.prefilling = None
        if self.prefix_cache is not None:
            self.prefix_cache.store(p.keys, p.kv.k[:, 0], p.kv.v[:, 0])
        sampler = Sampler([p.seq.params], [p.seq.ids], m.cfg.text.vocab_size, m.device)
        tokens, finished = self._pick(m.lm_head(hidden[:, -1]).float(), [p.seq], sampler)
        if finished:
            return self._leave_cache(p.seq, p.kv, 0)
        self._join(p, sampler, tokens)

    def _join(self, p: _Prefill, sampler: Sampler, tokens: torch.Tensor) -> None:
        L, dev = len(p.seq.ids), self.model.device
        if not self.rows:
            self.rows, self.cache, self.sampler = [p.seq], p.kv, sampler
            self.key_valid = torch.ones(1, L, dtype=torch.bool, device=dev)
            self.next_pos = torch.tensor([L + p.delta], device=dev)
            self.last = tokens
            return
        S = max(self.cache.length, L)
        self.cache = KVCache.stack([self.cache, p.kv], room=256)
        pad = lambda valid: torch.nn.functional.pad(valid, (S - valid.shape[1], 0), value=False)
        self.key_valid = torch.cat([pad(self.key_valid), pad(torch.ones(1, L, dtype=torch.bool, device=dev))])
        self.next_pos = torch.cat([self.next_pos, torch.tensor([L + p.delta], device=dev)])
        self.last = torch.cat([self.last, tokens])
        self.sampler.extend(sampler)
        self.rows.append(p.seq)

    def _decode(self) -> None:
        m = self.model
        gone = [i for i, s in enumerate(self.rows) if s.cancelled]
        for i in gone:
            self._finish(self.rows[i], "abort")
        if gone and not self._keep(gone):
            return
        if self.cache.length == self.cache.capacity:
            self.cache = KVCache.stack([self.cache], room=256)
        B = len(self.rows)
        key_valid = torch.cat([self.key_valid, self.key_valid.new_ones(B, 1)], dim=1)
        pos = self.next_pos.view(1, B, 1).expand(3, B, 1)  # the same position on all three rows
        hidden = m(m.model.embed_tokens(self.last[:, None]), pos, key_valid, self.cache)  # generated ids are text
        self.cache.advance(1)
        self.decode_steps += 1
        self.key_valid, self.next_pos = key_valid, self.next_pos + 1
        self.last, finished = self._pick(m.lm_head(hidden[:, -1]).float(), self.rows, self.sampler)
        if finished:
            self._keep(finished)

    def _keep(self, leaving: list[int]) -> bool:
        """Rows leave the batch (their keys and values go to the prefix cache); False when none is left."""
        S = self.cache.length
        for i in leaving:
            n = int(self.key_valid[i].sum())
            self._leave_cache(self.rows[i], self.cache, i, S - n)
        keep = [i for i in range(len(self.rows)) if i not in leaving]
        if not keep:
            self.rows, self.cache = [], None
            return False
        idx = torch.tensor(keep, device=self.model.device)
        valid = self.key_valid[idx]
        first = int(valid.any(0).long().argmax())  # columns that only left rows used go too
        self.cache.keep(idx, first)
        self.key_valid = valid[:, first:]
        self.next_pos, self.last = self.next_pos[idx], self.last[idx]
        self.sampler.keep(idx)
        self.rows = [self.rows[i] for i in keep]
        return True

    def _leave_cache(self, seq: Sequence, kv: KVCache, row: int, start: int = 0) -> None:
        """A finished sequence's prompt and answer (all but the last token, which has no keys yet) to the prefix
        cache, for the next turn of its conversation."""
        if self.prefix_cache is None or not seq.tokens or seq.finish_reason == "error":
            return
        ids = seq.ids + seq.tokens[:-1]
        n = kv.length - start
        if n != len(ids):
            return
        keys = self.prefix_cache.keys(ids, seq.media)
        self.prefix_cache.store(keys, kv.k[:, row, :, start:kv.length], kv.v[:, row, :, start:kv.length])

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence], sampler: Sampler) -> tuple[torch.Tensor, list[int]]:
        """The next token of each row, sent on as text; returns the tokens and the rows that finished."""
        want = max((s.params.top_logprobs if s.params.logprobs else -1) for s in seqs)
        matchers = [s.matcher for s in seqs]
        raw = logits.clone() if want >= 0 and any(matchers) else logits  # logprobs are the model's own
        mask_logits(logits, matchers)
        tokens = sampler(logits)
        chosen = values = ids = None
        if want >= 0:
            chosen, values, ids = (t.tolist() for t in logprobs(raw, tokens, want))
        finished, now = [], time.perf_counter()
        for i, (s, token) in enumerate(zip(seqs, tokens.tolist())):
            try:
                delta = self._emit(s, token, now, None if chosen is None else chosen[i],
                                   None if ids is None else list(zip(ids[i][:s.params.top_logprobs], values[i])))
            except Exception as e:  # noqa: BLE001 - one sequence's failure (its grammar, its text, its sink)
                self._fail(s, e)  # is its own: it leaves, the others go on
                finished.append(i)
                continue
            if delta.finish_reason:
                finished.append(i)
        return tokens, finished

    def _emit(self, s: Sequence, token: int, now: float, logprob: float | None, top: list | None) -> TextDelta:
        """One sequence's new token: its grammar and text advance, its stop rules apply, its caller gets the delta."""
        s.tokens.append(token)
        if s.matcher is not None:
            s.matcher.accept(token)
        text = s.stream.add(token) if s.stream else ""
        p, reason = s.params, None
        if token in p.stop_token_ids and len(s.tokens) > p.min_new_tokens:
            reason = "stop"
        elif (s.stream and s.stream.stopped) or (s.matcher is not None and s.matcher.done):
            reason = "stop"
        elif len(s.tokens) >= p.max_new_tokens:
            reason = "length"
        if reason:
            text += s.stream.finish() if s.stream else ""
        if s.last_token_at is None:
            self.observer.first_token(now - s.submitted)
        else:
            self.observer.next_token(now - s.last_token_at)
        s.last_token_at = now
        delta = TextDelta(s.row, text, token, reason, logprob, top)
        s.finish_reason = reason
        s.sink(delta)
        return delta

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.finish_reason = "error"
        try:
            seq.sink(error)
        except Exception:  # noqa: BLE001 - a caller that cannot even take its error is gone
            pass

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.sink(TextDelta(seq.row, seq.stream.finish() if seq.stream else "", -1, reason))

    @property
    def kv_bytes(self) -> int:
        """Bytes of keys and values held: the running batch, the prompt being prefilled and the prefix cache."""
        caches = [c for c in (self.cache, self.prefilling.kv if self.prefilling else None) if c is not None]
        return sum(c.bytes for c in caches) + (self.prefix_cache.bytes if self.prefix_cache else 0)


# ---------------------------------------------------------------------------------------------------------------
# Text: detokenized deltas with stop strings, and finished results


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    boxes: list[Box] = field(default_factory=list)  # grounding boxes in the answer, in original image pixels


def chat_result(seq: Sequence, deltas: list[TextDelta], image_token_id: int, video_token_id: int) -> ChatResult:
    """A finished sequence's answer from its deltas: the one place a ChatResult is made (API, CLI, server, batch)."""
    text = "".join(d.text for d in deltas)
    with_logprobs = bool(seq.params.logprobs)
    tokens = [d.token for d in deltas if d.token >= 0]
    return ChatResult(
        text=text, token_ids=tokens,
        boxes=parse_boxes(text, seq.inputs.image_sizes[0] if seq.inputs.image_sizes else None),
        finish_reason=seq.finish_reason or "length",
        usage=seq.usage(image_token_id, video_token_id),
        logprobs=[d.logprob for d in deltas if d.token >= 0] if with_logprobs else None,
        top_logprobs=[d.top_logprobs for d in deltas if d.token >= 0]
        if with_logprobs and any(d.top_logprobs for d in deltas) else None)
