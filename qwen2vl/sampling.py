"""Sampling parameters and the sampler: penalties, temperature, top-k, top-p, min-p, then a seeded draw.

The order is transformers': repetition penalty (and OpenAI's presence/frequency penalties), then temperature,
top-k, top-p, min-p. All rows of a batch are processed together; each row may have its own parameters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_SAMPLING_KNOBS = ("temperature", "top_p", "top_k", "min_p")
LOGIT_MAX = 1e30  # finite even after the smallest temperature (1e-5)


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy.

    Defaults come from the checkpoint's generation_config.json (Qwen2-VL: top_k 1, top_p 0.001, temperature 0.01,
    i.e. in effect greedy). Those four knobs act as one unit: if a caller sets any of temperature / top_p / top_k /
    min_p, the ones not set take neutral values (1.0 / 0 = off / 0.0) instead of the checkpoint's, so that
    `temperature=0.7` really samples.
    """
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # transformers' rule, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI's rules, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # strings that end generation; not part of the returned text
    stop_token_ids: list[int] = field(default_factory=list)  # eos ids (from generation_config.json by default)
    min_new_tokens: int = 0  # stop tokens are masked out before this many new tokens
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token, with logprobs=True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p <= 1:
            raise ValueError(f"invalid sampling parameters: temperature={self.temperature} (>= 0), "
                             f"top_p={self.top_p} (0, 1], top_k={self.top_k} (>= 0), min_p={self.min_p} [0, 1]")
        if self.repetition_penalty <= 0 or self.max_new_tokens < 1:
            raise ValueError("repetition_penalty must be > 0 and max_new_tokens >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_generation_config(cls, path: str | Path | None) -> "SamplingParams":
        """The checkpoint's defaults (neutral ones where there is no generation_config.json)."""
        file = Path(path) / "generation_config.json" if path is not None else None
        if file is None or not file.exists():
            return cls()
        g = json.loads(file.read_text())
        eos = g.get("eos_token_id", [])
        p = cls(stop_token_ids=list(eos) if isinstance(eos, list) else [eos],
                repetition_penalty=g.get("repetition_penalty", 1.0))
        if g.get("do_sample", False):
            p.temperature = g.get("temperature", 1.0)
            p.top_p = g.get("top_p", 1.0)
            p.top_k = g.get("top_k", 0) or 0
            p.min_p = g.get("min_p", 0.0) or 0.0
        else:
            p.temperature = 0.0
        return p

    def updated(self, params: "SamplingParams | None" = None, **overrides: Any) -> "SamplingParams":
        """These defaults with a caller's SamplingParams and/or keyword overrides applied (see the class doc)."""
        if params is not None:
            overrides = {**{f.name: getattr(params, f.name) for f in dataclasses.fields(params)}, **overrides}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {sorted(unknown)}")
        base = dataclasses.asdict(self)
        if any(k in overrides for k in _SAMPLING_KNOBS):
            base.update(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
        return SamplingParams(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


class Sampler:
    """Picks the next token of every row. Rows keep their parameters; `keep(rows)` drops finished rows."""

    def __init__(self, params: list[SamplingParams], prompt_ids: list[list[int]], vocab_size: int,
                 device: torch.device | str = "cpu"):
        self.params = params
        B = len(params)
        f = lambda name, dtype=torch.float32: torch.tensor([getattr(p, name) for p in params], dtype=dtype,
                                                           device=device)[:, None]
        self.temperature, self.top_p, self.min_p = f("temperature"), f("top_p"), f("min_p")
        self.top_k = f("top_k", torch.long)
        self.repetition, self.presence, self.frequency = (f("repetition_penalty"), f("presence_penalty"),
                                                           f("frequency_penalty"))
        self.greedy = torch.tensor([p.greedy for p in params], device=device)
        # Which tokens each row has seen (prompt + output) and how often it produced each (output only).
        self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
        for b, ids in enumerate(prompt_ids):
            self.seen[b, torch.tensor([i for i in ids if i < vocab_size], dtype=torch.long, device=device)] = True
        self.counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=device)
        self.generators = [None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed)
                           for p in params]
        self.steps = [0] * B  # tokens picked per row (min_new_tokens)

    _ROWS = ("temperature", "top_p", "min_p", "top_k", "repetition", "presence", "frequency", "greedy", "seen",
             "counts")

    def keep(self, rows: torch.Tensor) -> None:
        for name in self._ROWS:
            setattr(self, name, getattr(self, name)[rows])
        idx = rows.tolist()
        self.params = [self.params[i] for i in idx]
        self.generators = [self.generators[i] for i in idx]
        self.steps = [self.steps[i] for i in idx]

    def extend(self, other: "Sampler") -> None:
        """Append another sampler's rows (a sequence joining a running batch), state included."""
        for name in self._ROWS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        self.params, self.generators = self.params + other.params, self.generators + other.generators
        self.steps = self.steps + other.steps

    @property
    def penalized(self) -> bool:
        return any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in self.params)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits (B, V) -> processed logits (penalties, temperature, filters); -inf where excluded."""
        x = logits.float().clone()
        if self.penalized:  # (B, V) work only when some row asks for it
            # transformers' repetition penalty: divide positive logits, multiply negative ones
            penalized = torch.where(x > 0, x / self.repetition, x * self.repetition)
            x = torch.where(self.seen, penalized, x)
            x = x - self.presence * (self.counts > 0) - self.frequency * self.counts
            # extreme penalties overflow (x / 1e-30 = inf, 0 * inf = nan): keep every logit orderable
            x = torch.nan_to_num(x, nan=float("-inf"), posinf=LOGIT_MAX, neginf=float("-inf"))
        for b, p in enumerate(self.params):
            if p.stop_token_ids and self.steps[b] < p.min_new_tokens:
                x[b, [t for t in p.stop_token_ids if t < x.shape[1]]] = float("-inf")
        if bool(self.greedy.all()):
            return x  # argmax needs no temperature or filtering (and skips a sort over the vocabulary)
        x = x / torch.where(self.greedy[:, None], 1.0, self.temperature.clamp_min(1e-5))
        return _filter(x, self.top_k, self.top_p, self.min_p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token of every row (B,)."""
        x = self.process(logits)
        tokens = x.argmax(-1)
        probs = None
        for b in torch.nonzero(~self.greedy).flatten().tolist():
            if probs is None:
                probs = torch.softmax(x, -1)
            if bool(torch.isfinite(probs[b]).all()):  # a row with no finite logit left keeps its argmax
                tokens[b] = torch.multinomial(probs[b], 1, generator=self.generators[b])[0]
        self.record(tokens)
        return tokens

    def record(self, tokens: torch.Tensor) -> None:
        if self.penalized:
            rows = torch.arange(len(tokens), device=tokens.device)
            self.seen[rows, tokens] = True
            self.counts[rows, tokens] += 1
        self.steps = [n + 1 for n in self.steps]


def _filter(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p (the smallest set with probability >= top_p, as transformers), then min-p."""
    V = x.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp_max(V), V)
    sorted_x, order = x.sort(-1, descending=True)
    rank = torch.arange(V, device=x.device)[None, :]
    drop = rank >= k
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), -1)
    before = probs.cumsum(-1) - probs  # probability mass of the better tokens
    drop |= (before >= top_p) & (rank > 0)
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), -1)
    drop |= probs < min_p * probs[:, :1]
    return x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw model log-probabilities (before any sampling processing) of the chosen tokens (B,), and the top
    alternatives: values (B, top), ids (B, top)."""
    lp = torch.log_softmax(logits.float(), -1)
    chosen = lp.gather(-1, tokens[:, None])[:, 0]
    values, ids = lp.topk(top, -1) if top else (lp[:, :0], tokens[:, None][:, :0])
    return chosen, values, ids
