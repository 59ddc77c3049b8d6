"""uvicorn's server, stopping the engine's work as soon as a signal asks it to exit."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn

from gemmakit.serving.engine import Engine

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Server(uvicorn.Server):
    """On SIGINT/SIGTERM, uvicorn stops accepting connections and waits for the open ones;
    closing the engine first ends every request in flight (streams get an error event, others
    a 503), so that wait is short. The process then exits with status 0 (uvicorn itself would
    raise the signal again after its shutdown, which kills the process with it)."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.close()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only (a server run in a thread: tests)
            return
        before = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
