"""Serving speed of the real Gemma 3 270M: gemmakit's server (continuous batching) against
llama-cpp-python's OpenAI server on the same GGUF file, with the same clients in one run.

For 1, 4 and 16 concurrent clients, each sending `--requests` streamed /v1/completions requests
one after another (greedy, `--max-tokens` each, a different story opening per request), it
reports aggregate throughput (generated tokens / wall time, tokens counted by re-encoding each
answer with the model's tokenizer, the same count for both servers) and time to first token
(median and 90th percentile, from sending the request to its first text). Both servers run
side by side and take turns at each client count.

    .venv/bin/python benchmarks/serve.py                          # gemmakit and llama.cpp
    .venv/bin/python benchmarks/serve.py --clients 1 4 --requests 1 --max-tokens 32
    .venv/bin/python benchmarks/serve.py --skip-llama             # gemmakit only
    .venv/bin/python benchmarks/serve.py --quant none keep        # also on the Q4_K blocks

llama.cpp's server needs `pip install 'llama-cpp-python[server]'` (for this benchmark only).
Both servers get the same number of threads (--threads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

import gemmakit
from gemmakit.resolve import checkpoint_path

OPENINGS = [
    "Once upon a time, in a small village by the sea,",
    "The old lighthouse keeper had a secret:",
    "In the year 2150, the first city on Mars",
    "Every morning, the baker on Elm Street",
    "The letter arrived on a rainy Tuesday, and it said",
    "Deep in the forest, a fox and a crow",
    "When the power went out across the whole city,",
    "My grandmother always told me that the river",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, log: Path, timeout: float = 600) -> subprocess.Popen:
    """Start a server process and wait until `url`/v1/models answers."""
    out = log.open("w")
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{command[:4]} exited; see {log}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{command[:4]} did not come up in {timeout} s; see {log}")


async def one(http, url, model, prompt, max_tokens) -> tuple[float, str]:
    """(time to first text, answer) of one streamed greedy completion."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    sent, first, text = time.perf_counter(), None, ""
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            piece = chunk["choices"][0]["text"] if chunk["choices"] else ""
            if piece and first is None:
                first = time.perf_counter() - sent
            text += piece
    return (first if first is not None else time.perf_counter() - sent), text


async def load(url, model, clients, requests, max_tokens, count) -> dict:
    """`clients` concurrent clients, each sending `requests` requests in turn."""
    ttfts: list[float] = []
    tokens = 0

    async def client(c: int) -> None:
        nonlocal tokens
        for r in range(requests):
            prompt = OPENINGS[(c * requests + r) % len(OPENINGS)] + f" (story {c}.{r})"
            ttft, text = await one(http, url, model, prompt, max_tokens)
            ttfts.append(ttft)
            tokens += count(text)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        await one(http, url, model, "Hello", 4)  # warm-up
        t = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t
    ttfts.sort()
    return {
        "clients": clients,
        "requests": clients * requests,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttfts),
        "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="for each server")
    ap.add_argument("--dtype", default=None, help="gemmakit's dtype (default: the file's own)")
    ap.add_argument(
        "--quant",
        nargs="+",
        default=["none"],
        help="gemmakit's --quant, one server each (keep: the GGUF's quantized blocks, as "
        "llama.cpp runs them; none: dequantized to --dtype)",
    )
    ap.add_argument("--skip-llama", action="store_true", help="gemmakit's server only")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_serve"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gguf = checkpoint_path(args.model)
    tok = gemmakit.load_tokenizer(args.model)

    def count(text: str) -> int:
        return len(tok.encode(text, bos=False, special=False))

    servers = {}
    for quant in args.quant:
        port = free_port()
        name = "gemmakit" if quant == "none" else f"gemmakit-{quant}"
        servers[name] = (
            [
                sys.executable,
                "-m",
                "gemmakit.cli",
                "serve",
                "--model",
                args.model,
                "--port",
                str(port),
                "--threads",
                str(args.threads),
                "--max-batch",
                "16",
                "--log-level",
                "warning",
                *(["--dtype", args.dtype] if args.dtype else []),
                *(["--quant", quant] if quant != "none" else []),
            ],
            f"http://127.0.0.1:{port}",
            args.model,
        )
    if not args.skip_llama:
        port = free_port()
        servers["llama.cpp"] = (
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(gguf),
                "--port",
                str(port),
                "--n_threads",
                str(args.threads),
                "--n_ctx",
                "4096",
                # its default cancels the running answer whenever a new request arrives
                "--interrupt_requests",
                "False",
            ],
            f"http://127.0.0.1:{port}",
            str(gguf),
        )

    # Both servers stay up and take turns at each client count, so that a machine whose load
    # changes during the run (a shared one) weighs on both alike.
    results: dict[str, list[dict]] = {name: [] for name in servers}
    procs = []
    try:
        for name, (command, url, _) in servers.items():
            procs.append(start(command, url, args.out / f"{name}.log"))
        for clients in args.clients:
            for name, (_, url, model) in servers.items():
                row = asyncio.run(load(url, model, clients, args.requests, args.max_tokens, count))
                results[name].append(row)
                print(
                    f"{name:13} {clients:3} clients: {row['tokens_per_s']:7.1f} tok/s, "
                    f"TTFT median {row['ttft_median_s']:.2f} s, p90 {row['ttft_p90_s']:.2f} s "
                    f"({row['tokens']} tokens in {row['wall_s']:.1f} s)",
                    flush=True,
                )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"\nGemma 3 270M ({gguf.name}), {args.threads} threads per server, "
        f"{args.requests} request(s) per client, {args.max_tokens} greedy tokens each"
    )
    w = {name: max(16, len(name) + 8) for name in results}  # column widths
    print(f"{'clients':>8}" + "".join(f"{n + ' tok/s':>{w[n]}}{'TTFT med':>10}" for n in results))
    for i, clients in enumerate(args.clients):
        cells = "".join(
            f"{rows[i]['tokens_per_s']:{w[n]}.1f}{rows[i]['ttft_median_s']:9.2f}s"
            for n, rows in results.items()
        )
        print(f"{clients:8}{cells}")
    for name, ours in results.items():
        if len(ours) > 1:
            print(
                f"{name} {args.clients[-1]} clients / {args.clients[0]}: "
                f"{ours[-1]['tokens_per_s'] / ours[0]['tokens_per_s']:.1f}x"
            )


if __name__ == "__main__":
    main()
