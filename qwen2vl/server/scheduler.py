"""The server's side of the engine: one thread steps the model's Engine whenever there is work (sequences join and
leave between decode steps), and each request is a Job whose sequence's deltas cross over to the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ..cpu.threads import release_workers
from ..generate import Engine, Sequence


class Job:
    """A request's sequence and the asyncio queue its deltas arrive in (TextDelta..., then None; or an
    Exception)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events = loop, asyncio.Queue()
        self.seq: Sequence | None = None

    def send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        if isinstance(item, Exception) or getattr(item, "finish_reason", None) is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, None)

    @property
    def finished(self) -> bool:
        return self.seq is not None and self.seq.done

    def cancel(self) -> None:
        if self.seq is not None:
            self.seq.cancel()


class EngineThread:
    """The thread that steps the engine. The thread that starts it (which loaded the model) frees its OpenMP workers
    first, so that the engine's are the only ones (cpu/threads.py)."""

    def __init__(self, engine: Engine):
        self.engine, self.stopping = engine, threading.Event()
        release_workers()
        self.thread = threading.Thread(target=engine.serve_forever, args=(self.stopping,), name="qwen2vl-engine",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
