"""Generation, outside the model: the Engine that answers many sequences at once, and its caches.

The Python API, the CLI, the server and batch jobs all submit Sequences to an Engine. Each step:
- admits a waiting sequence once the KV pool has room for it: its prompt starts after the longest run of blocks
  the pool holds for it (the prefix cache), and the vision encoder runs only on images and videos with tokens after
  that prefix (the VisionCache skips the ones it has seen);
- prefills one chunk of it (short while others decode, so one long prompt does not stall everyone's tokens; longer
  alone, but always bounded), and once its prompt is done, picks its first token and joins the running Batch;
- decodes one token for every running row: each row reads its own keys through its block table, so rows of any
  lengths decode together in one forward; M-RoPE decode positions are per row.
A row leaves when it stops (stop token, stop string, length, a complete grammar) or is cancelled; its blocks go back
to the pool, keyed for the next turn.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .chat import TextStream, Tokenizer
from .datatypes import MediaItem, ModelInputs
from .errors import InputError
from .grammar import Matcher, mask_logits
from .grounding import Box
from .grounding import parse as parse_boxes
from .model import Qwen2VLModel
from .kv import BLOCK, BlockTable, KVPool, KVView, PoolFull, block_keys, blocks_for, content_key
from .sampling import Sampler, SamplingParams, logprobs


class VisionCache:
    """Vision-encoder outputs keyed by a hash of each image's (or video's) pixel rows and grid; LRU by bytes."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0

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
            self.entries.move_to_end(key)
            return self.entries[key]
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
        self.keys: list[bytes] | None = None  # the prompt's full blocks' keys (kv.block_keys)
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


@dataclass(frozen=True)
class EngineSettings:
    """How an engine batches and how much it keeps: built once, passed in."""
    max_batch: int = 16  # sequences decoding together
    prefill_chunk: int = 256  # prompt tokens per step while others decode (their next token waits for one chunk)
    prefill_chunk_alone: int = 1024  # prompt tokens per step when nothing decodes: memory stays bounded
    kv_cache_bytes: int = 2 << 30  # the KV pool (running sequences and the prefix cache); taken as it is written
    kv_format: str | None = None  # KV storage: "float32" | "float16" | "uint8"; None: the load plan's


@dataclass
class _Prefill:
    """A sequence whose prompt is being prefilled on its own, `done` tokens so far."""
    seq: Sequence
    table: BlockTable
    visual: list[tuple[MediaItem, torch.Tensor]]  # embeddings of the images and videos after the cached prefix
    positions: torch.Tensor  # (3, 1, L)
    delta: int  # M-RoPE: a token appended at index i has position i + delta
    done: int


class Batch:
    """The running sequences, decoding together: per row its sequence, block table, keys held, next M-RoPE position
    and last token, and one sampler over all rows. Rows join after their prefill and leave when they finish."""

    def __init__(self):
        self.seqs: list[Sequence] = []
        self.tables: list[BlockTable] = []
        self.table = torch.zeros(0, 1, dtype=torch.int32)  # (B, T): each row's block ids
        self.held = torch.zeros(0, dtype=torch.int32)  # (B,): keys each row holds in the pool
        self.next_pos = torch.zeros(0, dtype=torch.long)  # (B,)
        self.last = torch.zeros(0, dtype=torch.long)  # (B,): the token each row feeds next
        self.sampler: Sampler | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    def join(self, seq: Sequence, table: BlockTable, sampler: Sampler, token: torch.Tensor, next_pos: int) -> None:
        self.seqs.append(seq)
        self.tables.append(table)
        T = max(self.table.shape[1], len(table.blocks))
        row = torch.tensor(table.blocks + [0] * (T - len(table.blocks)), dtype=torch.int32)
        self.table = torch.cat([F.pad(self.table, (0, T - self.table.shape[1])), row[None]])
        self.held = torch.cat([self.held, torch.tensor([table.tokens], dtype=torch.int32)])
        self.next_pos = torch.cat([self.next_pos, torch.tensor([next_pos])])
        self.last = torch.cat([self.last, token])
        if self.sampler is None:
            self.sampler = sampler
        else:
            self.sampler.extend(sampler)

    def drop(self, rows: list[int]) -> None:
        keep = [i for i in range(len(self.seqs)) if i not in rows]
        idx = torch.tensor(keep, dtype=torch.long)
        self.seqs = [self.seqs[i] for i in keep]
        self.tables = [self.tables[i] for i in keep]
        self.table, self.held, self.next_pos, self.last = (t[idx] for t in (self.table, self.held, self.next_pos,
                                                                            self.last))
        if keep:
            self.sampler.keep(idx)
        else:
            self.sampler = None

    def view(self, pool: KVPool) -> KVView:
        """The next decode step's view: every row's table grown (from its reservation) to hold one more key."""
        for b, t in enumerate(self.tables):
            n = len(t.blocks)
            t.grow(pool, t.tokens + 1)
            if len(t.blocks) > n:
                if len(t.blocks) > self.table.shape[1]:
                    self.table = F.pad(self.table, (0, max(len(t.blocks), 2 * self.table.shape[1]) -
                                                    self.table.shape[1]))
                self.table[b, n:len(t.blocks)] = torch.tensor(t.blocks[n:], dtype=torch.int32)
        return KVView(pool, self.table, self.held, 1)

    def advance(self, tokens: torch.Tensor) -> None:
        """Every row wrote one key and picked its next token."""
        for t in self.tables:
            t.tokens += 1
        self.held += 1
        self.next_pos += 1
        self.last = tokens


class Observer:
    """What an engine reports (the server's metrics implement it); these defaults ignore it."""

    def prompt(self, tokens: int, cached: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...


class Engine:
    """Continuous batching over one model. Thread-safe: any thread may `submit`, and `step` runs under a lock, so
    the API's calls and a server's loop can share one engine (and its caches).

    Keys and values live in one KVPool: a sequence's prompt starts after the longest run of cached blocks, takes
    room for its prompt and longest answer when it is admitted (it waits while the pool lacks room), and gives its
    blocks back, keyed for reuse, when it leaves."""

    def __init__(self, model: Qwen2VLModel, tokenizer: Tokenizer | None, settings: EngineSettings | None = None,
                 kv_format: str = "float32", vision_cache: VisionCache | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings = settings or EngineSettings()
        t = model.cfg.text
        self.pool = KVPool(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, settings.kv_cache_bytes,
                           settings.kv_format or kv_format)
        self.vision_cache, self.observers = vision_cache, []
        self.lock = threading.RLock()
        self.work = threading.Condition(self.lock)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: _Prefill | None = None
        self.batch = Batch()
        self.prefill_tokens = 0  # prompt tokens computed (not taken from the prefix cache), over all sequences
        self.decode_steps = 0

    # -- the caller's side

    def watch(self, observer: Observer) -> None:
        """Report prompts and token timings to `observer` too (a server's metrics)."""
        self.observers.append(observer)

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
            for seq in [*self.waiting, *self.batch.seqs, *([self.prefilling.seq] if self.prefilling else [])]:
                seq.cancel()
            self.work.notify_all()

    @property
    def rows(self) -> list[Sequence]:
        """The running sequences."""
        return self.batch.seqs

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.batch)

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
            if self.prefilling is None and self.waiting and len(self.batch) < self.settings.max_batch:
                seq = self.waiting[0]  # first come, first served: a request that does not fit yet holds the line
                self.prefilling = self._guard([seq], lambda: self._start(seq))
                if self.prefilling is not None or seq.done:
                    self.waiting.popleft()
            if self.prefilling is not None:
                p = self.prefilling
                self._guard([p.seq], lambda: self._prefill(p))
            if self.batch:
                self._guard(list(self.batch.seqs), self._decode)

    def _guard(self, seqs: list[Sequence], work: Callable):
        """Run one piece of work; if it fails, only the sequences it serves fail (with the exception) and give
        their blocks back."""
        try:
            return work()
        except Exception as e:  # noqa: BLE001 - reported to each caller; the engine goes on
            for s in seqs:
                self._fail(s, e)
            if self.prefilling is not None and self.prefilling.seq in seqs:
                self.prefilling.table.free(self.pool)
                self.prefilling = None
            failed = [i for i, s in enumerate(self.batch.seqs) if s in seqs]
            for i in failed:
                self.batch.tables[i].free(self.pool)
            self.batch.drop(failed)
            return None

    def _start(self, seq: Sequence) -> _Prefill | None:
        """Admit a sequence: its cached prefix and room for the rest, then the vision encoder on the images and
        videos after the prefix. None (nothing taken) while the pool lacks room."""
        m, L = self.model, len(seq.ids)
        x = seq.inputs.to(m.device)
        items: list[MediaItem] = x.media(m.cfg.vision.spatial_merge_size, m.cfg.image_token_id, m.cfg.video_token_id)
        if seq.keys is None:  # hashed once, however long the sequence waits
            seq.media = [(i.start, i.end, content_key(i.pixels, i.grid)) for i in items]
            seq.keys = block_keys(seq.ids, seq.media)
        cached = self.pool.lookup(seq.keys, L - 1)  # the last token is always computed (its logits)
        need = blocks_for(L + seq.params.max_new_tokens) - len(cached)
        try:
            room = self.pool.reserve(need)
        except PoolFull as e:
            self.pool.release(cached)
            raise InputError(f"the prompt of {L} tokens and up to {seq.params.max_new_tokens} new ones {e}: "
                             "raise --kv-cache-bytes") from None
        if not room:
            self.pool.release(cached)
            return None
        table = BlockTable(cached, len(cached) * BLOCK, need)
        seq.cached_tokens = table.tokens
        for o in self.observers:
            o.prompt(L, table.tokens)
        try:
            encode = self.vision_cache.encoder(m) if self.vision_cache is not None else None
            visual = m.visual_embeddings(items, table.tokens, encode)
            positions, deltas = m.positions(x)
        except BaseException:
            table.free(self.pool)
            raise
        return _Prefill(seq, table, visual, positions, int(deltas[0]), table.tokens)

    def _prefill(self, p: _Prefill) -> None:
        m, L, s = self.model, len(p.seq.ids), self.settings
        if p.seq.cancelled:
            self.prefilling = None
            p.table.free(self.pool)
            return self._finish(p.seq, "abort")
        n = min(L - p.done, s.prefill_chunk if self.batch else s.prefill_chunk_alone)
        p.table.grow(self.pool, p.done + n)
        view = KVView(self.pool, torch.tensor([p.table.blocks], dtype=torch.int32),
                      torch.tensor([p.done], dtype=torch.int32), n)
        embeds = m.embed_range(p.seq.inputs.input_ids, p.done, p.done + n, p.visual)
        hidden = m(embeds, p.positions[:, :, p.done:p.done + n], cache=view)
        p.done = p.table.tokens = p.done + n
        self.pool.register(p.table.blocks[:p.done // BLOCK], p.seq.keys)  # full prompt blocks: reusable now
        self.prefill_tokens += n
        if p.done < L:
            return
        self.prefilling = None
        sampler = Sampler([p.seq.params], [p.seq.ids], m.cfg.text.vocab_size, m.device)
        tokens, finished = self._pick(m.lm_head(hidden[:, -1]).float(), [p.seq], sampler)
        if finished:
            return self._leave(p.seq, p.table)
        self.batch.join(p.seq, p.table, sampler, tokens, L + p.delta)

    def _decode(self) -> None:
        m, batch = self.model, self.batch
        gone = [i for i, s in enumerate(batch.seqs) if s.cancelled]
        for i in gone:
            self._finish(batch.seqs[i], "abort")
        self._drop(gone)
        if not batch:
            return
        B = len(batch)
        view = batch.view(self.pool)
        pos = batch.next_pos.view(1, B, 1).expand(3, B, 1)  # the same position on all three rows
        hidden = m(m.model.embed_tokens(batch.last[:, None]), pos, cache=view)  # generated ids are text
        self.decode_steps += 1
        tokens, finished = self._pick(m.lm_head(hidden[:, -1]).float(), batch.seqs, batch.sampler)
        batch.advance(tokens)
        self._drop(finished)

    def _drop(self, rows: list[int]) -> None:
        """Finished rows leave the batch, their blocks back to the pool (keyed for the next turn)."""
        for i in rows:
            self._leave(self.batch.seqs[i], self.batch.tables[i])
        if rows:
            self.batch.drop(rows)

    def _leave(self, seq: Sequence, table: BlockTable) -> None:
        """A finished sequence's blocks go back to the pool. Its prompt and answer (all but the last token, which
        has no keys) are keyed first, for the next turn of its conversation."""
        ids = seq.ids + seq.tokens[:-1]
        if seq.finish_reason != "error" and seq.tokens and table.tokens == len(ids):
            self.pool.register(table.blocks[:len(ids) // BLOCK], block_keys(ids, seq.media))
        table.free(self.pool)

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
        for o in self.observers:
            if s.last_token_at is None:
                o.first_token(now - s.submitted)
            else:
                o.next_token(now - s.last_token_at)
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
        """Bytes of the KV pool's blocks in use or cached (running sequences, the prompt being prefilled and the
        prefix cache)."""
        return self.pool.bytes


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
