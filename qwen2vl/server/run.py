"""Running the app: uvicorn until SIGTERM or Ctrl-C, then a drain. uvicorn stops accepting connections at once and
waits up to the shutdown timeout for the open ones; a second before the timeout, the sequences still running are
cancelled, so each stream ends with its final event and [DONE] rather than a cut connection. Then the process exits
by itself (uvicorn re-raises the signal: the conventional SIGTERM status)."""

from __future__ import annotations

import threading

import uvicorn
from fastapi import FastAPI


class Draining(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine, timeout: float):
        super().__init__(config)
        self.engine, self.timeout = engine, timeout

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:  # the first signal starts the drain
            timer = threading.Timer(max(0.0, self.timeout - 1.0), self.engine.cancel_all)
            timer.daemon = True
            timer.start()
        super().handle_exit(sig, frame)


def run(app: FastAPI, host: str, port: int, shutdown_timeout: float) -> None:
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout)
    Draining(config, app.state.engine, shutdown_timeout).run()
