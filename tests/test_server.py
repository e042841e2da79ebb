"""The OpenAI-compatible server, through the real `openai` client, against `havoc serve` in a subprocess."""

import contextlib
import dataclasses
import json
import re
import socket
import subprocess
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel

MODEL = "tiny-havoc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(directory, *extra):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "havoc.cli", "serve", str(directory), "--port", str(port),
                             "--model-name", MODEL, "--slots", "8", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code in (200, 503):
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(proc.stderr.read())


def _wait_ready(url):
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, httpx.get(f"{url}/health").text
        time.sleep(0.1)


def _model_folder(tmp_path_factory, tokenizer, config: HavocConfig):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("serve") / "model"
    HavocModel(dataclasses.replace(config, vocab_size=tokenizer.vocab_size)).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return _model_folder(tmp_path_factory, tokenizer, HavocConfig.havoc_tiny())


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory, tokenizer):
    """A model slow enough on a CPU (the small preset) that long requests are surely still running."""
    return _model_folder(tmp_path_factory, tokenizer, HavocConfig.havoc_small())


@pytest.fixture(scope="module")
def url(model_dir):
    proc, url = _start(model_dir)
    _wait_ready(url)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _alive(url):
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    _alive(url)


def test_completion_text_and_token_prompts(client, tokenizer):
    text = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=8, temperature=0)
    assert text.object == "text_completion" and text.choices[0].finish_reason in ("length", "stop")
    ids = tokenizer.encode("def add(a, b):")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    assert text.usage.prompt_tokens == len(ids) and text.usage.total_tokens == len(ids) + text.usage.completion_tokens


def _assert_greedy_is_generate(client, model_dir, tokenizer, tokens):
    model = HavocModel.load_pretrained(model_dir)
    prompt = tokenizer.encode("import os\n")
    out = model.generate([prompt], max_new_tokens=tokens, eos_token_id=None)[0, len(prompt):].tolist()
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=tokens, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == tokenizer.decode(out, skip_special_tokens=True)


def test_greedy_completion_equals_model_generate(client, model_dir, tokenizer):
    _assert_greedy_is_generate(client, model_dir, tokenizer, 12)


def _chat_reference(model_dir, tokenizer, messages, max_tokens):
    """The reply `model.generate` gives for the chat template, cut at <|end|> or <|eos|>."""
    model = HavocModel.load_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    new = model.generate([prompt], max_new_tokens=max_tokens, eos_token_id=None)[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(new) if t in (tokenizer.end_token_id, tokenizer.eos_token_id)]
    return tokenizer.decode(new[: ends[0]] if ends else new, skip_special_tokens=True), len(prompt), bool(ends)


def test_chat(client, model_dir, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    text, prompt_tokens, stopped = _chat_reference(model_dir, tokenizer, messages, 10)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == ("stop" if stopped else "length")
    assert reply.usage.prompt_tokens == prompt_tokens


def test_chat_accepts_content_parts_and_the_developer_role(client):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?\nThere."}]
    newer = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hello?"}, {"type": "text", "text": "There."}]}]
    a, b = (client.chat.completions.create(model=MODEL, messages=m, max_tokens=8, temperature=0) for m in (plain, newer))
    assert a.choices[0].message.content == b.choices[0].message.content and a.usage == b.usage
    with pytest.raises(openai.BadRequestError, match="only text parts are supported, got a 'image_url' part"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streamed_equals_non_streamed_for_the_same_seed(client, kind):
    common = dict(model=MODEL, max_tokens=24, temperature=1.0, seed=42)
    if kind == "completions":
        whole = client.completions.create(prompt="class Stack:", **common).choices[0].text
        chunks = client.completions.create(prompt="class Stack:", stream=True, stream_options={"include_usage": True},
                                           **common)
        parts, usage = [], None
        for chunk in chunks:
            parts += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
    else:
        messages = [{"role": "user", "content": "Tell me about stacks."}]
        whole = client.chat.completions.create(messages=messages, **common).choices[0].message.content
        chunks = client.chat.completions.create(messages=messages, stream=True, stream_options={"include_usage": True},
                                                **common)
        parts, usage = [], None
        for chunk in chunks:
            parts += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
    assert "".join(parts) == whole
    assert usage is not None and usage.completion_tokens >= 1


def test_sse_wire_format_ends_with_done(url):
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3,
                                                             "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_n_choices(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt="x =", max_tokens=8, temperature=1.0, n=3, seed=1,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2] and len({c.text for c in out.choices}) > 1
    # The prompt is counted once, whatever n is; each choice ran to max_tokens.
    assert out.usage.prompt_tokens == len(tokenizer.encode("x ="))
    assert out.usage.completion_tokens == 3 * 8 and all(c.finish_reason == "length" for c in out.choices)
    two = client.completions.create(model=MODEL, prompt=["x =", "y = 2"], max_tokens=2, n=2, seed=1)
    assert two.usage.prompt_tokens == len(tokenizer.encode("x =")) + len(tokenizer.encode("y = 2"))
    assert [c.index for c in two.choices] == [0, 1, 2, 3]


@pytest.mark.parametrize("max_tokens", [1, 7, 30])
def test_completion_tokens_equal_max_tokens_when_the_length_ends_it(client, max_tokens):
    out = client.completions.create(model=MODEL, prompt="def", max_tokens=max_tokens, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == max_tokens
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                          max_completion_tokens=max_tokens, extra_body={"ignore_eos": True,
                                                                                         "stop_token_ids": []})
    if chat.choices[0].finish_reason == "length":
        assert chat.usage.completion_tokens == max_tokens
    else:  # the reply ended at <|end|>, which is not counted as text but is a generated token
        assert chat.usage.completion_tokens <= max_tokens


def test_stop_strings(client):
    free = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[5:7]
    assert stop
    out = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == free[: free.find(stop)] and out.choices[0].finish_reason == "stop"


def test_logprobs_and_echo_match_the_model(client, model_dir, tokenizer):
    model = HavocModel.load_pretrained(model_dir)
    prompt = tokenizer.encode("def add(a, b):\n    return a + b")
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=2, echo=True)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None
    assert out.choices[0].text.startswith(tokenizer.decode(prompt))
    with torch.no_grad():
        log_probs = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = log_probs[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(prompt)]), expected, atol=1e-4, rtol=0)
    assert len(lp.top_logprobs[-1]) == 2
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    entry = chat.choices[0].logprobs.content[0]
    assert entry.logprob <= 0 and len(entry.top_logprobs) == 2


def test_tokenize_detokenize_and_metrics(url, tokenizer):
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "héllo wörld"}).json()["tokens"]
    assert ids == tokenizer.encode("héllo wörld")
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == "héllo wörld"
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("havoc_requests_total", "havoc_generated_tokens_total", "havoc_queue_depth",
                 "havoc_time_to_first_token_seconds_bucket", "havoc_request_latency_seconds_bucket"):
        assert name in metrics


@pytest.mark.parametrize("body, param, fragment", [
    ({"max_tokens": -1}, "max_tokens", "max_tokens must be an integer >= 1"),
    ({"max_tokens": 10**6}, "max_tokens", "+ max_tokens (1000000)"),
    ({"temperature": 5}, "temperature", "temperature must be in [0, 2]"),
    ({"model": "gpt-4"}, "model", "model 'gpt-4' is not served here"),
    ({"prompt": ""}, "prompt", "prompt must not be empty"),
    ({"prompt": [5, 99999]}, "prompt", "token id 99999 is outside the vocabulary"),
    ({"prompt": "x" * 4000, "max_tokens": 1}, "max_tokens", "exceeds the context of 256 tokens"),
])
def test_invalid_fields_get_openai_errors(url, body, param, fragment):
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert fragment in error["message"]
    _alive(url)


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)


def test_malformed_json_unknown_routes_and_methods(url):
    r = httpx.post(f"{url}/v1/completions", content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    metrics = httpx.get(f"{url}/metrics").text
    assert 'route="unmatched",status="404"' in metrics and "/v1/nothing" not in metrics
    r = httpx.get(f"{url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    _alive(url)


def test_api_key(model_dir):
    proc, url = _start(model_dir, "--api-key", "sesame")
    try:
        _wait_ready(url)
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).choices
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _assert_load_fails(url, fragment):
    """The server never loads its model: /health is 503 and says why."""
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health").json()["status"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.1)
    r = httpx.get(f"{url}/health")
    assert r.status_code == 503 and fragment in r.json()["detail"]


def test_health_is_503_until_the_model_loads(tmp_path):
    (tmp_path / "config.json").write_text("{broken")  # never loads: /health says why, the API answers 503
    proc, url = _start(tmp_path)
    try:
        _assert_load_fails(url, "config.json")
        assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 503
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _metric(url, name) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} metric")


def _running(url) -> float:
    return _metric(url, "havoc_running_sequences")


def _assert_freed(url):
    """The slots of a client that left are freed within seconds, and nothing more is generated for it."""
    deadline = time.monotonic() + 5
    while _running(url) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _running(url) == 0
    generated = _metric(url, "havoc_generated_tokens_total")
    time.sleep(0.3)
    assert _metric(url, "havoc_generated_tokens_total") == generated < 1000


def test_client_disconnect_frees_the_slot(slow_model_dir):
    proc, url = _start(slow_model_dir)
    try:
        _wait_ready(url)
        with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1000,
                                                                 "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            assert _running(url) == 1
        _assert_freed(url)
        _alive(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_32_concurrent_streams_without_cross_talk(client, url):
    prompts = [f"def function_{i}(x):" for i in range(32)]
    expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0.8, seed=i).choices[0].text
                for i, p in enumerate(prompts[:4])}

    def stream(i):
        chunks = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=16, temperature=0.8, seed=i,
                                           stream=True)
        return "".join(c.text for chunk in chunks for c in chunk.choices)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, range(32)))
    again = list(ThreadPoolExecutor(32).map(stream, range(32)))
    assert results == again  # each stream depends on its own request only
    for p, text in expected.items():
        assert results[prompts.index(p)] == text
    _alive(url)


def test_an_engine_failure_is_a_500_and_the_server_goes_on(model_dir, monkeypatch):
    with _in_process(model_dir, slots=2) as (engine, http):
        real = engine._prefill_chunk
        failures = [1, 2]

        def flaky(seq, size):
            if failures:
                failures.pop()
                raise RuntimeError("simulated kernel failure")
            return real(seq, size)

        monkeypatch.setattr(engine, "_prefill_chunk", flaky)
        body = {"model": MODEL, "prompt": "x = 1 + 2", "max_tokens": 4}  # a prompt to prefill
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert "simulated kernel failure" in r.json()["error"]["message"]
        lines = [line for line in http.post("/v1/completions", json={**body, "stream": True}).text.splitlines() if line]
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "server_error"
        assert lines[-1] == "data: [DONE]"
        assert http.post("/v1/completions", json=body).status_code == 200


def test_every_sequence_records_its_time_to_first_token_once(client, url):
    before = _metric(url, "havoc_time_to_first_token_seconds_count")
    client.completions.create(model=MODEL, prompt="x", max_tokens=20, n=3, temperature=1.0, seed=3,
                              extra_body={"ignore_eos": True})
    assert _metric(url, "havoc_time_to_first_token_seconds_count") == before + 3


def test_oversized_chunked_body_without_content_length(url):
    def body():  # chunked transfer encoding: the limit must be enforced while reading
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(f"{url}/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    _alive(url)


# Hardening: one request never harms another, and nothing reaches a client unshaped.
def test_extreme_sampling_values_never_fail_another_stream(client, url):
    def stream():
        chunks = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=120, temperature=1.0,
                                           seed=21, stream=True, extra_body={"ignore_eos": True})
        return "".join(c.text for chunk in chunks for c in chunk.choices)

    alone = stream()
    with ThreadPoolExecutor(4) as pool:
        innocent = pool.submit(stream)
        odd = [pool.submit(client.completions.create, model=MODEL, prompt="x", max_tokens=30, **kw)
               for kw in ({"temperature": 1e-40}, {"temperature": 1.0, "extra_body": {"repetition_penalty": 1e-40}},
                          {"temperature": 2.0, "top_p": 1e-9, "extra_body": {"repetition_penalty": 1e-40}})]
        assert all(f.result().choices[0].finish_reason in ("length", "stop") for f in odd)
        assert innocent.result() == alone
    _alive(url)


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": -2**63 - 1}, "seed"),
    ("/v1/completions", {"prompt": "a \ud800 b"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "bad \udfff"]}, "prompt[1]"),
    ("/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, "stop[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
])
def test_unreadable_input_is_a_400_naming_the_field(url, route, body, param):
    payload = json.dumps({"model": MODEL, "max_tokens": 2, **body} if route != "/tokenize" else body)
    r = httpx.post(f"{url}{route}", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    _alive(url)


def test_max_completion_tokens_is_max_tokens(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                           max_completion_tokens=5, extra_body={"ignore_eos": True,
                                                                                 "stop_token_ids": []})
    assert reply.usage.completion_tokens <= 5
    assert reply.choices[0].finish_reason == "stop" or reply.usage.completion_tokens == 5


def test_requests_are_bounded(url):
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert "3 prompts x n=3 = 9 sequences; one request may ask for at most 8" in r.json()["error"]["message"]


@contextlib.contextmanager
def _in_process(model_dir, **options):
    """(engine, client) of an app in this process, ready; its exceptions come back as responses."""
    from starlette.testclient import TestClient

    from havoc_inference.server import create_app

    app = create_app(str(model_dir), model_name=MODEL, **options)
    with TestClient(app, raise_server_exceptions=False) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        engine = app.app.state.server.engine
        try:
            yield engine, http
        finally:
            engine.stop()


def test_an_unexpected_error_is_a_logged_counted_500_in_openai_shape(model_dir, monkeypatch, caplog):
    with _in_process(model_dir) as (engine, http):
        def broken(*args, **kwargs):
            raise RuntimeError("simulated tokenizer bug")

        monkeypatch.setattr(engine.tokenizer, "encode", broken)
        with caplog.at_level("ERROR"):
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json()["error"] == {"message": "internal server error (RuntimeError)", "type": "server_error",
                                     "param": None, "code": None}
        assert "simulated tokenizer bug" in caplog.text and "Traceback" in caplog.text
        assert 'havoc_requests_total{route="/v1/completions",status="500"} 1.0' in http.get("/metrics").text
        monkeypatch.undo()
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200


def test_tokenization_runs_off_the_event_loop(model_dir, monkeypatch):
    import threading

    with _in_process(model_dir) as (engine, http):
        threads = {}
        for name in ("encode", "apply_chat_template"):
            real = getattr(engine.tokenizer, name)
            monkeypatch.setattr(engine.tokenizer, name, lambda *a, _real=real, _name=name, **k: (
                threads.setdefault(_name, threading.current_thread()), _real(*a, **k))[1])
        real_cancel = engine.cancel  # called by the handler itself, on the event loop's thread
        monkeypatch.setattr(engine, "cancel", lambda *a, **k: (
            threads.setdefault("loop", threading.current_thread()), real_cancel(*a, **k))[1])
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x = 1", "max_tokens": 1}).status_code == 200
        assert http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 1,
                                                       "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        assert threads["encode"] is not threads["loop"] and threads["apply_chat_template"] is not threads["loop"]


def test_the_chat_page_has_security_headers(url):
    r = httpx.get(f"{url}/")
    policy = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert r.headers["x-content-type-options"] == "nosniff"


def test_api_key_is_compared_in_constant_time(model_dir, monkeypatch):
    import secrets

    calls = []
    real = secrets.compare_digest
    monkeypatch.setattr(secrets, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    with _in_process(model_dir, api_key="sesame") as (engine, http):
        assert http.get("/v1/models", headers={"Authorization": "Bearer sesamE"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert calls[-2:] == [(b"Bearer sesamE", b"Bearer sesame"), (b"Bearer sesame", b"Bearer sesame")]


def _long(stream=False):
    return {"model": MODEL, "prompt": "x", "max_tokens": 1000, "ignore_eos": True, "stream": stream}


def test_a_non_streaming_client_that_leaves_frees_its_slot(slow_model_dir):
    proc, url = _start(slow_model_dir)
    try:
        _wait_ready(url)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=_long(), timeout=1.0)
        _assert_freed(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_full_queue_is_a_429_with_retry_after(slow_model_dir):
    proc, url = _start(slow_model_dir, "--slots", "1", "--max-queue", "1")  # the later --slots wins
    try:
        _wait_ready(url)
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(httpx.post, f"{url}/v1/completions", json={**_long(), "max_tokens": 60}, timeout=60)
            while _running(url) == 0:
                time.sleep(0.02)
            waiting = pool.submit(httpx.post, f"{url}/v1/completions", json={**_long(), "max_tokens": 2}, timeout=60)
            while _metric(url, "havoc_queue_depth") == 0:
                time.sleep(0.02)
            r = httpx.post(f"{url}/v1/completions", json={**_long(), "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error" and "retry shortly" in r.json()["error"]["message"]
            assert busy.result().status_code == waiting.result().status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT", "SIGINT"]])
def test_shutdown_ends_streams_cleanly_and_exits(slow_model_dir, signals):
    import signal as signal_module

    proc, url = _start(slow_model_dir, "--shutdown-timeout", "1")
    try:
        _wait_ready(url)
        with httpx.stream("POST", f"{url}/v1/completions", json=_long(stream=True), timeout=30) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            sent = time.monotonic()
            for name in signals:
                proc.send_signal(getattr(signal_module, name))
                time.sleep(0.2)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "abort"
        proc.wait(timeout=15)
        assert time.monotonic() - sent < 10
        stderr = proc.stderr.read()
        assert "terminate called" not in stderr and "Aborted" not in stderr and "Traceback" not in stderr, stderr
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        proc.kill()
        proc.wait()


def test_serves_bf16_weights_on_the_cpu(model_dir, tokenizer):
    """`--dtype bfloat16`: the server answers the openai client with the bf16 engine's own tokens."""
    from havoc_core.pretrained import load_model_and_tokenizer
    from havoc_inference.engine import Engine
    from havoc_inference.sampling import SamplingParams

    model, _ = load_model_and_tokenizer(model_dir, dtype="bfloat16")
    prompt = "def add(a, b):"
    expected = Engine(model, tokenizer, slots=1).generate(
        tokenizer.encode(prompt), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].tokens
    proc, url = _start(model_dir, "--dtype", "bfloat16")
    try:
        _wait_ready(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True}, logprobs=0)
        assert reply.choices[0].logprobs.tokens  # per-token log-probabilities come back in bf16 too
        assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        sampled = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, seed=5,
                                            extra_body={"ignore_eos": True})
        assert sampled.usage.completion_tokens == 12
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_turns_reuse_the_prefix_cache_and_answer_as_without_it(client, url, model_dir):
    proc, uncached_url = _start(model_dir, "--no-prefix-cache")
    try:
        _wait_ready(uncached_url)
        uncached = openai.OpenAI(base_url=f"{uncached_url}/v1", api_key="unused", max_retries=0)
        system = {"role": "system", "content": "You are HAVOC, a terse assistant that answers in Python. " * 6}
        conversations, spent = {}, {}
        for name, c, u in (("cached", client, url), ("uncached", uncached, uncached_url)):
            before = [_metric(u, m) for m in ("havoc_prefix_cache_hits_total", "havoc_prefill_tokens_total")]
            messages = [system, {"role": "user", "content": "write a stack"}]
            for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
                reply = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                  extra_body={"ignore_eos": True}, **sampling)
                messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                             {"role": "user", "content": "and now a queue"}]
            conversations[name] = messages
            spent[name] = [_metric(u, m) - b for m, b in zip(("havoc_prefix_cache_hits_total",
                                                               "havoc_prefill_tokens_total"), before)]
        assert conversations["cached"] == conversations["uncached"]
        (hits, prefilled), (no_hits, no_prefill) = spent["cached"], spent["uncached"]
        # The second turn finds the system prompt and the first turn in the cache.
        assert no_hits == 0 and hits >= 48 and prefilled <= no_prefill - hits
        assert 0 < _metric(url, "havoc_prefix_cache_hit_rate") < 1
        assert _metric(uncached_url, "havoc_prefix_cache_hit_rate") == 0
        assert "havoc_kv_cache_usage" in httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_request_longer_than_the_whole_kv_cache_is_a_400_naming_both_numbers(model_dir):
    with _in_process(model_dir, kv_cache_tokens=64) as (engine, http):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 50, "max_tokens": 20})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "= 70 exceeds the whole KV cache of 64 tokens" in r.json()["error"]["message"]
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 64
        # Without max_tokens a chat may use what the pool leaves, and is served.
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text


class Ticket(pydantic.BaseModel):
    """What the openai client's parse() turns into a strict json_schema response_format."""

    priority: typing.Literal["low", "high"]
    votes: int = pydantic.Field(ge=0, le=99)
    closed: bool
    labels: list[typing.Literal["bug", "docs"]] = pydantic.Field(max_length=3)


def test_chat_parse_into_a_pydantic_model(client):
    for seed in range(5):
        reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A ticket?"}],
                                              response_format=Ticket, max_tokens=80, seed=seed)
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(reply.choices[0].message.parsed, Ticket)


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "ok"],
          "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}, "ok": {"type": "boolean"}}}


def test_response_format_streamed_and_on_completions(client):
    form = {"type": "json_schema", "json_schema": {"name": "pair", "schema": SCHEMA, "strict": True}}
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], seed=3,
                                            max_tokens=40, response_format=form, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    done = client.completions.create(model=MODEL, prompt="x", max_tokens=40, seed=3, n=4,
                                     extra_body={"response_format": {"type": "json_object"}})
    assert all(isinstance(json.loads(c.text), dict) for c in done.choices if c.finish_reason == "stop")
    cut = client.completions.create(model=MODEL, prompt="x", max_tokens=3, seed=3, extra_body={"response_format": form})
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3


def test_structured_outputs_choice_and_regex(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "?"}], n=6, seed=1,
                                           max_tokens=10, extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert {c.message.content for c in reply.choices} <= {"left", "right"}
    done = client.completions.create(model=MODEL, prompt="id:", max_tokens=20, seed=1,
                                     extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]{3}"}})
    assert re.fullmatch("[A-Z]{2}[0-9]{3}", done.choices[0].text)


@pytest.mark.parametrize("extra, param, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "objectx"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs a json_schema field"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "unclosed group"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "Extra inputs"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
])
def test_invalid_constraints_are_400s_naming_the_problem(url, extra, param, fragment):
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "?"}],
                                                      **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    _alive(url)


def test_speculative_serving_with_a_draft(model_dir, tokenizer, tmp_path_factory, corpus_files):
    """--speculate with --draft (here the model itself, so every guess is accepted): greedy output is
    the model's own, and /metrics counts the guesses."""
    proc, url = _start(model_dir, "--speculate", "3", "--draft", str(model_dir))
    try:
        _wait_ready(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        _assert_greedy_is_generate(client, model_dir, tokenizer, 20)
        accepted = _metric(url, "havoc_speculative_accepted_tokens_total")
        assert accepted == _metric(url, "havoc_speculative_draft_tokens_total") and accepted > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    from havoc_core.tokenizer import Corpus, HavocTokenizer

    other = tmp_path_factory.mktemp("other") / "draft"
    other_tokenizer = HavocTokenizer.train(Corpus(corpus_files[:5]), vocab_size=tokenizer.vocab_size)
    HavocModel(dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=other_tokenizer.vocab_size)).save_pretrained(other)
    other_tokenizer.save(other)
    proc, url = _start(model_dir, "--speculate", "3", "--draft", str(other))
    try:
        _assert_load_fails(url, "another tokenizer")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
