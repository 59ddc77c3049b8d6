"""A live gemmakit server on loopback for the serving tests: a tiny model with varied random
weights and a small trained tokenizer, served by uvicorn in a thread on a free port."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from helpers import multilingual_texts

from gemmakit.api import build_model
from gemmakit.config import get_config
from gemmakit.serving.app import create_app
from gemmakit.serving.engine import Engine
from gemmakit.tokenizer import train_tokenizer

MODEL = "tiny-test"


def tiny_model(vocab: int = 4096):
    """Random weights large enough that greedy answers depend on the whole context."""
    return build_model(get_config("tiny").replace(vocab_size=vocab), seed=0, init_std=0.2)


def tiny_tokenizer(folder):
    return train_tokenizer(multilingual_texts(300), vocab_size=800, output=folder / "tok")


class SlowEngine(Engine):
    """The tiny model decodes a token in about a millisecond, so a long answer can finish (and
    leave nothing to cancel) before a client that hangs up, or a browser's Stop click, reaches
    the server: each decode step is slowed by `step_delay` seconds."""

    def __init__(self, *args, step_delay: float = 0.03, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_delay = step_delay

    def _decode(self) -> None:
        time.sleep(self.step_delay)
        super()._decode()


class LiveServer:
    """`create_app(engine, ...)` served on 127.0.0.1:<free port> until `stop`."""

    def __init__(self, engine: Engine, tokenizer, api_key: str | None = None) -> None:
        self.engine = engine
        self.app = create_app(engine, tokenizer, MODEL, api_key=api_key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()
