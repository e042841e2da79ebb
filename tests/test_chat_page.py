"""The chat page at / in a real headless Chromium (Debian's), driven by Playwright."""

import dataclasses
import json
import shutil
import time

import httpx
import pytest
import torch
from playwright.sync_api import sync_playwright

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from test_server import MODEL, _metric, _start, _wait_ready

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's probe starts it: root needs --no-sandbox; the rest keeps it off the closed network.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def url(tmp_path_factory, tokenizer):
    # The small preset's size: slow enough on a CPU that a long reply can be stopped mid-way.
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("page") / "model"
    config = dataclasses.replace(HavocConfig.havoc_small(), vocab_size=tokenizer.vocab_size)
    HavocModel(config).save_pretrained(directory)
    tokenizer.save(directory)
    proc, url = _start(directory)
    _wait_ready(url)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def page(url, tmp_path):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page()
        page.console_errors = []
        page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
        page.goto(url)
        yield page
        page.screenshot(path=str(tmp_path / "chat.png"))
        browser.close()


def test_streams_a_reply_equal_to_the_api(page, url):
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    page.wait_for_selector(".assistant[data-done='true']", timeout=60_000)
    assert page.text_content(".user") == "Hello there"
    reply = page.text_content(".assistant")
    api = httpx.post(f"{url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
        "temperature": 0, "top_p": 0.95}, timeout=60).json()
    assert reply == api["choices"][0]["message"]["content"]
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    assert not [e for e in page.console_errors if "Content Security Policy" in e]  # the page obeys its own CSP


def test_stop_button_ends_the_reply_and_frees_the_slot(page, url):
    page.fill("#max_tokens", "900")
    # A seed: about 1 random seed in 200 makes this random model end its reply within 5 characters.
    page.fill("#seed", "1")
    page.fill("#input", "Write a long story.")
    page.click("#send")
    deadline = time.monotonic() + 60  # polled from here: the page's CSP forbids the eval of wait_for_function
    while len(page.text_content(".assistant") or "") <= 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_selector(".assistant[data-done='true']", timeout=10_000)
    deadline = time.monotonic() + 5
    while _metric(url, "havoc_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(url, "havoc_running_sequences") == 0
    assert _metric(url, "havoc_generated_tokens_total") < 900


def _sent_messages(page):
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    return bodies


def test_errors_are_shown_and_leave_no_dangling_turn(page):
    sent = _sent_messages(page)
    page.fill("#temperature", "7")
    page.fill("#input", "hi")
    page.click("#send")
    page.wait_for_selector(".error", timeout=30_000)
    assert "temperature" in page.text_content(".error")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "3")
    page.fill("#input", "second try")
    page.click("#send")
    page.wait_for_selector(".assistant[data-done='true']:not(.error)", timeout=60_000)
    assert sent[-1]["messages"] == [{"role": "user", "content": "second try"}]


def test_an_error_inside_the_stream_is_shown(page):
    # A server whose generation fails after the stream began sends an error object, then [DONE].
    error = {"error": {"message": "generation failed: simulated", "type": "server_error", "param": None,
                       "code": "engine_error"}}
    start = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "par"}, "finish_reason": None}]}
    body = f"data: {json.dumps(start)}\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=body))
    sent = _sent_messages(page)
    page.fill("#input", "hi")
    page.click("#send")
    page.wait_for_selector(".error", timeout=30_000)
    assert page.text_content(".error") == "generation failed: simulated"
    page.unroute("**/v1/chat/completions")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "3")
    page.fill("#input", "again")
    page.click("#send")
    page.wait_for_selector(".assistant[data-done='true']:not(.error)", timeout=60_000)
    assert sent[-1]["messages"] == [{"role": "user", "content": "again"}]  # no half reply, no dangling "hi"
