"""`gemmakit serve` with real clients on loopback: the `openai` client (completions and chat,
streamed and not), sampling options, errors as OpenAI's error body, the API key, a queue that
fills, and 16 concurrent clients with disconnects and malformed requests mixed in."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from serving import MODEL, LiveServer, SlowEngine, tiny_model, tiny_tokenizer

from gemmakit.chat import encode_chat
from gemmakit.generation import generate
from gemmakit.serving.engine import Engine


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


@pytest.fixture(scope="module")
def server(model, tok):
    # 5 ms a step: a 400-token answer lasts over 2 s, so the clients that hang up after 0.5 s
    # (or 3 streamed tokens) always leave it running, however fast the machine decodes
    live = LiveServer(SlowEngine(model, max_batch=8, prefill_chunk=32, step_delay=0.005), tok)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(model, tok, ids, n, chat=False):
    """What `gemmakit generate` (or `gemmakit chat`, whose stops add <start_of_turn>) gives."""
    t = tok.token_ids(model.config.tokens)
    stops = {t.eos, t.end_of_turn} | ({t.start_of_turn} if chat else set())
    out = generate(model, [ids], n, stop_tokens=stops)[0]
    return tok.decode(out), len(out)


def test_completion_greedy_equals_generate(client, model, tok):
    for prompt, n in [("the cat", 12), ("Der Hund und die Katze", 30), ("x", 1)]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
        text, count = greedy(model, tok, tok.encode(prompt, bos=True), n)
        choice = r.choices[0]
        assert choice.text == text
        assert choice.finish_reason == ("length" if count == n else "stop")
        assert r.usage.prompt_tokens == len(tok.encode(prompt, bos=True))
        assert r.usage.completion_tokens == count
        assert r.object == "text_completion" and r.model == MODEL


def test_chat_streamed_and_whole_agree_with_generate(client, model, tok):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "the dog sat on the mat"},
    ]
    ids = encode_chat(tok, messages, add_generation_prompt=True, token_ids=model.config.tokens).ids
    text, _ = greedy(model, tok, ids, 25, chat=True)
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=25, temperature=0
    )
    assert whole.choices[0].message.content == text
    assert whole.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=25,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len(chunks) > 3  # tokens came one by one, not in one piece


def test_streamed_completion_ends_with_done(server):
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_stop_strings_cut_the_answer(client, model, tok):
    text, _ = greedy(model, tok, tok.encode("the bird", bos=True), 40)
    assert len(text) > 12, "the tiny model's answer is too short for this test"
    stop = text[5:8]
    before = text[: text.index(stop)]
    for stream in (False, True):
        r = client.completions.create(
            model=MODEL,
            prompt="the bird",
            max_tokens=40,
            temperature=0,
            stop=[stop, "@@@"],
            stream=stream,
        )
        if stream:
            parts = list(r)
            got = "".join(p.choices[0].text for p in parts)
            finish = parts[-1].choices[0].finish_reason
        else:
            got, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (got, finish) == (before, "stop")


def test_n_choices_and_seeds(client):
    def ask(seed):
        r = client.completions.create(
            model=MODEL, prompt="the", max_tokens=8, temperature=1.0, top_p=0.95, n=3, seed=seed
        )
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.text for c in r.choices]

    first = ask(1)
    assert ask(1) == first  # a seed makes sampling repeatable
    assert len(set(first)) > 1  # and the n choices differ
    assert ask(2) != first


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


LONG = "the cat sat on the mat " * 200

BAD = [
    # (body or raw text, status, param, what)
    ("{not json", 400, None, "not valid JSON"),
    ("[1, 2]", 400, None, ""),
    ({"model": MODEL}, 400, "prompt", "Missing"),
    ({"model": MODEL, "prompt": "a", "foo": 1}, 400, "foo", "Unrecognized"),
    ({"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens", ""),
    ({"model": MODEL, "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens", ""),
    ({"model": MODEL, "prompt": "a", "temperature": -1}, 400, "temperature", ""),
    ({"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p", ""),
    ({"model": MODEL, "prompt": "a", "n": 100}, 400, "n", ""),
    ({"model": MODEL, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ""),
    ({"model": MODEL, "prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty", ""),
    ({"model": MODEL, "prompt": [1, 99999]}, 400, "prompt", "token ids"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model", "does not exist"),
    ({"model": MODEL, "prompt": LONG}, 400, "prompt", "maximum context length"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 100000}, 400, "max_tokens", "maximum context"),
]

BAD_CHAT = [
    ({"model": MODEL, "messages": []}, 400, "messages", ""),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, None, ""),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", ""),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, None, ""),
    ({"model": MODEL, "messages": "hi"}, 400, "messages", ""),
]


def post(url, body, **kwargs):
    if isinstance(body, str):
        headers = {"content-type": "application/json"}
        return httpx.post(url, content=body, headers=headers, timeout=30, **kwargs)
    return httpx.post(url, json=body, timeout=30, **kwargs)


@pytest.mark.parametrize(
    "path, body, status, param, what",
    [("/v1/completions", *b) for b in BAD] + [("/v1/chat/completions", *b) for b in BAD_CHAT],
)
def test_bad_requests_get_openai_errors(server, path, body, status, param, what):
    r = post(server.url + path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert what in error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)
    if status == 404:
        assert error["code"] == "model_not_found"


def test_unknown_routes_and_methods_get_error_bodies(server):
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and "message" in r.json()["error"]
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "message" in r.json()["error"]
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_a_full_queue_answers_429_and_then_serves(model, tok):
    live = LiveServer(Engine(model, max_batch=1, max_queue=2), tok)
    try:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 2, "n": 3}
        r = post(live.url + "/v1/completions", body)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        r = post(live.url + "/v1/completions", {**body, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
    finally:
        live.stop()


def test_the_api_key_guards_every_route(model, tok):
    live = LiveServer(Engine(model), tok, api_key="sekret")
    try:
        for method, path in [
            ("GET", "/health"),
            ("GET", "/v1/models"),
            ("GET", "/"),
            ("POST", "/v1/completions"),
            ("GET", "/static/chat.js"),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = httpx.request(method, live.url + path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
        good = {"Authorization": "Bearer sekret"}
        assert httpx.get(live.url + "/health", headers=good).status_code == 200
        assert httpx.get(live.url + "/?key=sekret").status_code == 200
        assert httpx.get(live.url + "/v1/models?key=sekret").status_code == 401  # page only
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="sekret", max_retries=0)
        assert c.completions.create(model=MODEL, prompt="a", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="no", max_retries=0).models.list()
    finally:
        live.stop()


def test_sixteen_clients_with_disconnects_and_garbage_mixed_in(server, model, tok):
    """9 greedy answers (streamed and not) must equal each one alone; 3 clients vanish
    mid-stream and 1 while waiting for a whole answer; 3 send malformed requests; nothing hangs
    and the server serves on."""
    prompts = [f"the {w} number {i}" for i, w in enumerate(["cat", "dog", "bird", "fish"] * 4)]
    jobs = []
    for i in range(9):
        n = 6 + 5 * (i % 4)
        text, _ = greedy(model, tok, tok.encode(prompts[i], bos=True), n)
        jobs.append(("answer", prompts[i], n, i % 2 == 0, text))
    jobs += [("vanish", p, 400, True, None) for p in prompts[10:13]]
    jobs += [("vanish", prompts[13], 400, False, None)]
    jobs += [("garbage", "{", 0, False, None), ("garbage", {"prompt": 5}, 0, False, None)]
    jobs += [("garbage", {"model": MODEL, "prompt": "a", "max_tokens": -3}, 0, False, None)]
    assert len(jobs) == 16
    url = server.url + "/v1/completions"

    async def one(kind, prompt, n, stream, expected, http):
        if kind == "garbage":
            body = prompt
            if isinstance(body, str):
                r = await http.post(url, content=body, headers={"content-type": "application/json"})
            else:
                r = await http.post(url, json=body)
            assert r.status_code == 400 and r.json()["error"]["message"]
            return
        body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0}
        if kind == "vanish" and not stream:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
                await http.post(url, json=body, timeout=httpx.Timeout(60, read=0.5))
            return
        if not stream:
            r = await http.post(url, json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected
            return
        got, seen = "", 0
        async with http.stream("POST", url, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                got += json.loads(line[6:])["choices"][0]["text"]
                seen += 1
                if kind == "vanish" and seen == 3:
                    return  # closes the connection mid-stream
        assert got == expected

    async def main():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            await asyncio.wait_for(asyncio.gather(*(one(*j, http) for j in jobs)), 90)

    cancelled = server.engine.cancelled
    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 90
    # the vanished clients' rows were freed, and the server still answers
    deadline = time.monotonic() + 10
    while server.engine.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.load() == {"waiting": 0, "running": 0}
    assert server.engine.cancelled - cancelled >= 4  # not run to their 400 tokens
    assert server.engine.most_rows > 2
    r = post(url, {"model": MODEL, "prompt": prompts[0], "max_tokens": 6, "temperature": 0})
    assert r.json()["choices"][0]["text"] == jobs[0][4]
