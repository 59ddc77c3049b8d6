"""`gemmakit serve` as a process: it answers greedy completions as `gemmakit generate` prints
them, and SIGTERM ends a stream in flight and the process, cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from helpers import subprocess_env
from serving import tiny_model, tiny_tokenizer

import gemmakit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    tok = tiny_tokenizer(folder)
    gemmakit.checkpoint.save_hf(
        tiny_model(tok.vocab_size),
        folder / "m",
        extra_files={"tokenizer.model": folder / "tok.model"},
    )
    return folder / "m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, **kwargs):
    command = [sys.executable, "-m", "gemmakit.cli", *args]
    return subprocess.Popen(command, env=subprocess_env(), **kwargs)


def test_serve_answers_as_generate_and_stops_on_sigterm(checkpoint):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = cli(
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--port",
        str(port),
        "--log-level",
        "warning",
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        generate = cli(
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--max-new-tokens",
            "10",
            "the cat",
            stdout=subprocess.PIPE,
            text=True,
        )
        printed = generate.communicate(timeout=120)[0]
        assert generate.returncode == 0
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["m"]  # the checkpoint folder's name
        body = {"model": "m", "prompt": "the cat", "max_tokens": 10, "temperature": 0}
        text = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        text = text["choices"][0]["text"]
        # generate prints the prompt, the continuation and a newline; a trailing incomplete
        # UTF-8 sequence it never prints, the server gives as U+FFFD
        assert printed.startswith("the cat")
        assert text.rstrip("\ufffd") == printed[len("the cat") : -1].rstrip("\ufffd")

        lines = []
        stream = {**body, "max_tokens": 480, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=stream, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                if len(lines) == 3:
                    server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        last = lines[-1]  # ended early: an error event saying why (or done, if it was quick)
        assert last == "data: [DONE]" or "shutting down" in json.loads(last[6:])["error"]["message"]
        assert len(lines) < 480
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
