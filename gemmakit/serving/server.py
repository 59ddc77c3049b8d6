"""uvicorn's server, stopping the engine's work as soon as a signal asks it to exit."""

from __future__ import annotations

import uvicorn

from gemmakit.serving.engine import Engine


class Server(uvicorn.Server):
    """On SIGINT/SIGTERM, uvicorn stops accepting connections and waits for the open ones;
    closing the engine first ends every request in flight (streams get an error event, others
    a 503), so that wait is short and the process exits cleanly."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.close()
        super().handle_exit(sig, frame)
