"""Requests share decode steps: a scheduler thread gathers the requests waiting when it is free (up to
`max_batch`), runs them as one batch through the generation loop, and routes each row's text deltas back to its
request. A request whose client left is stopped at the next step. A failing batch fails only its own requests."""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from ..datatypes import ModelInputs
from ..generate import Generation, stream_text
from ..sampling import SamplingParams


@dataclass
class Job:
    inputs: ModelInputs
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # TextDelta, then None; or an Exception
    cancelled: bool = False
    finished: bool = False  # set when its last event has been sent

    def send(self, item: Any) -> None:
        if item is None or isinstance(item, Exception):
            self.finished = True
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Scheduler:
    def __init__(self, model, max_batch: int = 16, gather_seconds: float = 0.02):
        self.model = model  # a qwen2vl.Qwen2VL
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self.pending: queue.Queue[Job] = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._run, name="qwen2vl-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    def _take(self) -> list[Job]:
        jobs = [self.pending.get()]
        try:  # requests arriving together decode together
            while len(jobs) < self.max_batch:
                jobs.append(self.pending.get(timeout=self.gather_seconds))
        except queue.Empty:
            pass
        for j in jobs:
            if j.cancelled:  # its client left before it started
                j.send(None)
        return [j for j in jobs if not j.cancelled]

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                continue
            self.batches += 1
            try:
                self._batch(jobs)
            except Exception as e:  # noqa: BLE001 - one batch's failure must not stop the server
                for job in jobs:
                    job.send(e)

    def _batch(self, jobs: list[Job]) -> None:
        tokenizer = self.model.processor.tokenizer
        inputs = ModelInputs.cat([j.inputs for j in jobs], tokenizer.pad_id)
        generation = Generation(self.model.model, inputs, [j.params for j in jobs], self.model.vision_cache)
        done = set()
        for delta in stream_text(generation, tokenizer):
            jobs[delta.row].send(delta)
            if delta.finish_reason is not None:
                done.add(delta.row)
                jobs[delta.row].send(None)
            for row, job in enumerate(jobs):
                if job.cancelled and row not in done:
                    generation.stop(row, "abort")
        for row, job in enumerate(jobs):
            if row not in done:
                job.send(None)
