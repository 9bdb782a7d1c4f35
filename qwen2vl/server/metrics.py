"""GET /metrics in Prometheus' text format (prometheus_client): requests running and waiting, tokens and tokens/s,
time to first token and time per output token histograms, prefix-cache hits, and key/value bytes held."""

from __future__ import annotations

import threading
import time
from collections import deque

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..generate import Engine, Observer

WINDOW = 10.0  # seconds over which the tokens/s gauge is measured


class Metrics(Observer):
    """The engine's observer, and the registry /metrics serves (one per app)."""

    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        g = lambda name, doc, f: Gauge(name, doc, registry=r).set_function(f)
        g("qwen2vl_requests_running", "Sequences being prefilled or decoded",
          lambda: len(engine.rows) + (engine.prefilling is not None))
        g("qwen2vl_requests_waiting", "Sequences waiting to start", lambda: len(engine.waiting))
        pool = engine.pool
        g("qwen2vl_kv_cache_bytes", "Bytes of the KV pool's blocks holding keys and values (in use or cached)",
          lambda: pool.bytes)
        g("qwen2vl_kv_cache_used_bytes", "Bytes of the KV pool's blocks that running sequences reference",
          lambda: pool.used_bytes)
        g("qwen2vl_kv_cache_capacity_bytes", "Bytes the KV pool can hold (--kv-cache-bytes)",
          lambda: pool.capacity_bytes)
        g("qwen2vl_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up",
          lambda: pool.hit_rate)
        g("qwen2vl_generation_tokens_per_second", f"Tokens generated per second over the last {WINDOW:g} s",
          self._rate)
        self.prompt_tokens = Counter("qwen2vl_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.cached_tokens = Counter("qwen2vl_prefix_cache_hit_tokens", "Prompt tokens served from the prefix "
                                     "cache", registry=r)
        self.generated = Counter("qwen2vl_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("qwen2vl_time_to_first_token_seconds", "From submission to the first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.tpot = Histogram("qwen2vl_time_per_output_token_seconds", "Between a sequence's tokens",
                              buckets=(0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5),
                              registry=r)
        self.recent: deque[float] = deque()
        self.lock = threading.Lock()

    def prompt(self, tokens: int, cached: int) -> None:
        self.prompt_tokens.inc(tokens)
        self.cached_tokens.inc(cached)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self._token()

    def next_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)
        self._token()

    def _token(self) -> None:
        self.generated.inc()
        with self.lock:
            self.recent.append(time.monotonic())

    def _rate(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0] < now - WINDOW:
                self.recent.popleft()
            return len(self.recent) / WINDOW

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
