"""The chat page in headless Chromium (Debian's `chromium`, driven by Playwright): a message
typed, the answer streamed in, the conversation kept across turns, Stop and New chat."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from serving import LiveServer, SlowEngine, tiny_model, tiny_tokenizer

from gemmakit.chat import encode_chat
from gemmakit.generation import generate

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="no chromium to drive (apt-get install -y chromium; `make test` installs it)",
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def answer(model, tok, messages, n):
    """The greedy answer the server gives to `messages` (Gemma chat format, chat stops)."""
    t = tok.token_ids(model.config.tokens)
    ids = encode_chat(tok, messages, add_generation_prompt=True, token_ids=model.config.tokens).ids
    out = generate(model, [ids], n, stop_tokens={t.eos, t.end_of_turn, t.start_of_turn})[0]
    return tok.decode(out)


def test_chatting_in_the_browser(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    model = tiny_model(tok.vocab_size)
    # 30 ms a step: 450 tokens last about 14 s, so Stop always finds the answer running
    live = LiveServer(SlowEngine(model), tok, api_key="k3y")
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            page.goto(live.url + "/?key=k3y")  # the page keeps the key, drops it from the URL
            page.wait_for_function("document.getElementById('model').textContent === 'tiny-test'")
            assert "key=" not in page.url
            page.click("#settings summary")  # the sampling settings
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "24")

            def say(text):
                page.fill("#input", text)
                page.press("#input", "Enter")
                page.wait_for_selector(".msg.assistant.streaming", state="detached", timeout=30000)
                return page.locator(".msg.assistant").last.text_content()

            first = say("the cat sat on the mat")
            expected = answer(
                model, tok, [{"role": "user", "content": "the cat sat on the mat"}], 24
            )
            assert first == expected and first
            page.screenshot(path=str(tmp_path / "chat.png"))
            assert (tmp_path / "chat.png").stat().st_size > 1000
            # the conversation is kept: the second answer continues the whole of it
            second = say("and the dog")
            history = [
                {"role": "user", "content": "the cat sat on the mat"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "and the dog"},
            ]
            assert second == answer(model, tok, history, 24)
            assert page.locator(".msg.user").count() == 2
            # New chat empties it; Stop ends a long answer, which the server cancels
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0
            page.fill("#max-tokens", "450")
            cancelled = live.engine.cancelled
            page.fill("#input", "tell me a long story")
            page.press("#input", "Enter")
            page.wait_for_function(
                "document.querySelector('.msg.assistant.streaming')?.textContent.length > 0"
            )
            page.click("#stop")
            page.wait_for_selector(".msg.assistant .stopped", timeout=10000)
            assert page.locator("#stop").is_disabled() and page.locator("#send").is_enabled()
            browser.close()
        deadline = time.monotonic() + 10
        while live.engine.cancelled == cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.engine.cancelled > cancelled  # the server stopped generating it
    finally:
        live.stop()
