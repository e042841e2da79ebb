"""`havoc serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the inference engine.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (503 while
loading), GET /metrics (Prometheus), POST /tokenize, POST /detokenize, and the chat page at /.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from havoc_core.model import HavocModel
from havoc_core.pretrained import load_model_and_tokenizer
from havoc_core.tokenizer import HavocTokenizer
from havoc_inference.engine import ContextTooLong, Draining, Engine, Event, QueueFull, Sequence, TokenLogprob
from havoc_inference.sampling import InvalidParameter, SamplingParams
from havoc_inference.structured import InvalidConstraint, grammar

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def _error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None):
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status,
                        headers=headers)


def _check_text(value: Any, path: str) -> None:
    """Every string of a request body must be encodable Unicode: JSON admits lone surrogates
    ("\\ud800"), which no tokenizer can read. Raises a 400 naming the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{path} is not valid Unicode text: a lone surrogate at character {e.start}",
                           param=path) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{path}[{i}]")


# Request bodies. Sampling fields beyond OpenAI's (top_k, min_p, repetition_penalty, ...) follow vLLM's names.
class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool = Field({}, alias="schema")  # absent: any JSON value
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's: plain text, any JSON object, or JSON valid under a schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (an extra field): exactly one constraint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")  # a JSON schema
    regex: str | None = None  # the whole output matches it
    choice: list[str] | None = None  # the output is one of these
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    logprobs: int | None = None
    echo: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def plain(self, i: int) -> dict:
        """The message as the chat template takes it: `developer` is OpenAI's newer name for `system`,
        and a list of text parts is joined by newlines (as vLLM does)."""
        content = self.content
        if isinstance(content, list):
            other = next((part.type for part in content if part.type != "text" or part.text is None), None)
            if other is not None:
                raise APIError(400, f"messages[{i}].content: only text parts are supported, got a {other!r} part",
                               param=f"messages[{i}].content")
            content = "\n".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


def _plain_messages(messages: list[ChatMessage]) -> list[dict]:
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    return [m.plain(i) for i, m in enumerate(messages)]


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class _Guard:
    """The outermost ASGI layer: the 1 MB body limit (413), the request counter, a last-resort 500.

    The body is read here, up to the limit, and replayed to the app: FastAPI would turn an error
    raised while it reads the body into a generic 400, and would miss a chunked body's size.
    Requests are counted here, from the status actually sent, so that failures count too.
    """

    def __init__(self, app: FastAPI, server: Server, limit: int):
        self.app, self.server, self.limit = app, server, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._limited(scope, receive, counted_send)
        except Exception:
            if status is None:  # the app's own handler answered and logged whatever was answerable
                logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
                await _error_response(500, "internal server error", "server_error")(scope, receive, counted_send)
        finally:
            if status is not None:
                # The route's template, never the raw path: random URLs must not create new metric series.
                route = getattr(scope.get("route"), "path", "unmatched")
                self.server.requests.labels(route, str(status)).inc()

    async def _limited(self, scope, receive, send):
        too_large = _error_response(413, f"request body exceeds {self.limit} bytes", "invalid_request_error",
                                    code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: disconnect notices, which the handlers watch

        await self.app(scope, replay, send)


def _page_headers(page: str) -> dict[str, str]:
    """The chat page's security headers; its inline script and style are allowed by their hashes only."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
              "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer"}


class _EngineCounters:
    """The engine's running totals as Prometheus counters (read at scrape time)."""

    COUNTERS = [("havoc_prefix_cache_queries", "Prompt positions looked up in the prefix cache", "prefix_queries"),
                ("havoc_prefix_cache_hits", "Prompt positions found in the prefix cache", "prefix_hits"),
                ("havoc_prefill_tokens", "Positions computed by prefill chunks", "prefill_tokens"),
                ("havoc_preemptions", "Sequences preempted for KV cache space (recomputed later)", "preemptions"),
                ("havoc_speculative_draft_tokens", "Tokens guessed by speculative decoding", "draft_tokens"),
                ("havoc_speculative_accepted_tokens", "Guessed tokens the target model accepted", "accepted_tokens")]

    def __init__(self, server: Server):
        self.server = server

    def collect(self):
        for name, documentation, attribute in self.COUNTERS:
            engine = self.server.engine
            yield CounterMetricFamily(name, documentation, value=getattr(engine, attribute) if engine else 0)


class Server:
    """The app's state: the engine (loaded in the background), the model's name, limits and metrics."""

    def __init__(self, checkpoint: str, tokenizer: str | None, model_name: str | None, device: str,
                 dtype: str | None, quantize: str | None, max_seqs_per_request: int | None, engine_options: dict):
        self.model_name = model_name or Path(checkpoint).resolve().name
        self.max_seqs_per_request = max_seqs_per_request or engine_options["slots"]
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.metrics = CollectorRegistry()
        self.requests = Counter("havoc_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.metrics)
        self.prompt_tokens = Counter("havoc_prompt_tokens", "Prompt tokens processed", registry=self.metrics)
        self.generated_tokens = Counter("havoc_generated_tokens", "Tokens generated", registry=self.metrics)
        self.ttft = Histogram("havoc_time_to_first_token_seconds", "Time to first token", registry=self.metrics)
        self.latency = Histogram("havoc_request_latency_seconds", "Whole-request latency", registry=self.metrics)
        Gauge("havoc_queue_depth", "Sequences waiting or prefilling", registry=self.metrics).set_function(
            lambda: self.engine.queue_depth if self.engine else 0)
        Gauge("havoc_running_sequences", "Sequences running (each holds KV cache blocks)", registry=self.metrics).set_function(
            lambda: len(self.engine.running) if self.engine else 0)
        Gauge("havoc_kv_cache_usage", "Fraction of the KV cache's blocks that running sequences hold",
              registry=self.metrics).set_function(lambda: self.engine.kv_cache_usage if self.engine else 0)
        Gauge("havoc_prefix_cache_hit_rate", "Prompt positions found in the prefix cache / positions looked up",
              registry=self.metrics).set_function(
            lambda: self.engine.prefix_hits / self.engine.prefix_queries if self.engine and self.engine.prefix_queries else 0)
        self.metrics.register(_EngineCounters(self))

        def load() -> None:
            try:
                model, tok = load_model_and_tokenizer(checkpoint, tokenizer, device=device, dtype=dtype,
                                                      quantize=quantize)
                options = dict(engine_options)
                if options.get("draft") is not None:
                    options["draft"] = _load_draft(options["draft"], tok, device, dtype)
                engine = Engine(model, tok, **options)
                engine.start(warm_up=engine.compiled)  # /health stays 503 until every batch size is compiled
                self.engine = engine
            except Exception as e:  # reported by /health; the process stays up to say why
                self.load_error = f"{type(e).__name__}: {e}"

        threading.Thread(target=load, name="havoc-load", daemon=True).start()

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise APIError(503, self.load_error or "the model is still loading; retry shortly",
                           type="server_error" if self.load_error else "service_unavailable", code="model_not_ready")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(400, f"model {name!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")


def _grammar(body: _Sampling) -> str | None:
    """The llguidance grammar of the request's `response_format` or `structured_outputs`, if any."""
    form = body.response_format if body.response_format is not None and body.response_format.type != "text" else None
    outputs = body.structured_outputs
    if form is not None and outputs is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    try:
        if form is not None and form.type == "json_object":
            return grammar("json_object")
        if form is not None:
            if form.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs a json_schema field "
                                    "({\"name\": ..., \"schema\": ...})", param="response_format.json_schema")
            # strict: false lets llguidance skip the schema keywords it cannot enforce.
            return grammar("json_schema", form.json_schema.schema_, lenient=form.json_schema.strict is False)
        if outputs is not None:
            given = {kind: value for kind, value in (("json", outputs.json_), ("regex", outputs.regex),
                                                     ("choice", outputs.choice), ("grammar", outputs.grammar))
                     if value is not None}
            if len(given) != 1:
                raise APIError(400, f"structured_outputs takes exactly one of json, regex, choice, grammar; got "
                                    f"{', '.join(given) or 'none'}", param="structured_outputs")
            (kind, value), = given.items()
            return grammar(kind, value)
    except InvalidConstraint as e:
        raise APIError(400, f"{_constraint_field(body)}: {e}", param=_constraint_field(body)) from None
    return None


def _constraint_field(body: _Sampling) -> str:
    return "structured_outputs" if body.structured_outputs is not None else "response_format"


def _load_draft(directory: str, target_tokenizer: HavocTokenizer, device: str, dtype: str | None) -> HavocModel:
    """The draft model of --draft: its tokenizer must be the target's, token for token."""
    draft, tok = load_model_and_tokenizer(directory, device=device, dtype=dtype)
    if tok.sha256 != target_tokenizer.sha256:
        raise ValueError(f"the draft model {directory} has another tokenizer than the served model; "
                         "a draft must share the target's tokenizer")
    return draft


def _sampling_params(body: _Sampling, max_tokens: int, logprobs: int | None, echo: bool,
                     extra_stop_ids: list[int], max_tokens_field: str = "max_tokens") -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            min_p=body.min_p, repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, stop=stop, stop_token_ids=body.stop_token_ids + extra_stop_ids,
            ignore_eos=body.ignore_eos, seed=body.seed, logprobs=logprobs, echo=echo, grammar=_grammar(body),
        )
    except InvalidParameter as e:
        param = max_tokens_field if e.param == "max_tokens" else e.param
        raise APIError(400, str(e).replace("max_tokens", param), param=param) from None


def create_app(checkpoint: str, tokenizer: str | None = None, model_name: str | None = None, api_key: str | None = None,
               device: str = "cpu", dtype: str | None = None, quantize: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_seqs_per_request: int | None = None, slots: int = 8,
               **engine_options) -> FastAPI:
    """The ASGI app. `engine_options` go to the Engine (context, compile, max_queue: the sequences
    that may wait, past which requests get 429, kv_cache_tokens, prefix_caching, step_tokens,
    speculate; draft, a model folder, is loaded beside the model);
    `max_seqs_per_request` bounds prompts x n of one request (default: slots)."""
    server = Server(checkpoint, tokenizer, model_name, device, dtype, quantize, max_seqs_per_request,
                    {"slots": slots, **engine_options})
    app = FastAPI(title="HAVOC", docs_url=None, redoc_url=None)
    app.state.server = server
    page = PAGE.read_text()
    page_headers = _page_headers(page)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return _error_response(400, f"the request body is not valid JSON: {first.get('msg')}",
                                   "invalid_request_error", code="invalid_json")
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(400, f"{param or 'body'}: {first.get('msg')}", "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _error_response(e.status_code, message, kind)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=e)
        return _error_response(500, f"internal server error ({type(e).__name__})", "server_error")

    async def authorize(request: Request) -> None:
        sent = request.headers.get("authorization", "").encode()
        if api_key is not None and not secrets.compare_digest(sent, f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    guarded = [Depends(authorize)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health():
        if server.engine is None:
            return JSONResponse({"status": "error" if server.load_error else "loading", "detail": server.load_error},
                                status_code=503)
        return {"status": "ok", "model": server.model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        engine = server.ready_engine()
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "havoc", "max_model_len": engine.max_model_len}]}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest):
        engine = server.ready_engine()
        server.check_model(body.model)
        _check_text(body.model_dump(), "")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if body.prompt is not None:
            tokens = await asyncio.to_thread(engine.tokenizer.encode, body.prompt)
        else:
            tokens = await asyncio.to_thread(engine.tokenizer.apply_chat_template, _plain_messages(body.messages), True)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest):
        engine = server.ready_engine()
        server.check_model(body.model)
        try:
            return {"prompt": engine.tokenizer.decode(body.tokens)}
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from None

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        engine = server.ready_engine()
        server.check_model(body.model)
        _check_text(body.model_dump(), "")
        params = _sampling_params(body, body.max_tokens, body.logprobs, body.echo, [])
        # Tokenizing 1 MB takes a while: off the event loop, so that running streams go on.
        prompts = await asyncio.to_thread(_prompts, body.prompt, engine)
        return await _run(server, engine, request, "text_completion", prompts, params, body)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatRequest, request: Request):
        engine = server.ready_engine()
        server.check_model(body.model)
        _check_text(body.model_dump(), "")
        messages = _plain_messages(body.messages)
        prompt = await asyncio.to_thread(engine.tokenizer.apply_chat_template, messages, True)
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # no limit asked: whatever the context leaves
            max_tokens = max(1, engine.max_model_len - len(prompt))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        # An assistant turn ends with <|end|>.
        params = _sampling_params(body, max_tokens, logprobs, False, [engine.tokenizer.end_token_id], field)
        return await _run(server, engine, request, "chat.completion", [prompt], params, body)

    return _Guard(app, server, max_body_bytes)  # type: ignore[return-value]


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 10.0,
          **app_options) -> None:
    """Run the server until SIGTERM or Ctrl-C, then shut down gracefully: stop accepting, let running
    sequences finish for up to `shutdown_timeout` seconds, end the rest with finish_reason "abort"
    (a clean final chunk), and stop the engine thread before the process exits."""
    import uvicorn

    app = create_app(checkpoint, **app_options)
    state: Server = app.app.state.server  # type: ignore[attr-defined]

    class GracefulServer(uvicorn.Server):
        signals = 0

        def handle_exit(self, sig, frame) -> None:
            # Not uvicorn's own: the first signal drains, a second ends every sequence now (each
            # stream still gets its final chunk), a third forces the exit. Nor is the signal raised
            # again after shutdown: a re-raised Ctrl-C lands in asyncio's runner as a traceback.
            self.signals += 1
            self.should_exit = True
            self.force_exit = self.signals >= 3
            if state.engine is not None:
                state.engine.drain(shutdown_timeout if self.signals == 1 else 0)

    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=shutdown_timeout + 5)  # a backstop; the drain ends streams first
    try:
        GracefulServer(config).run()
    finally:
        if state.engine is not None:
            state.engine.stop()  # joined: a torch call cut off at interpreter exit would abort the process


def _prompts(prompt, engine: Engine) -> list[list[int]]:
    """Token ids of each prompt: text, token ids, or a list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    ids = [engine.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if any(not p for p in ids):
        raise APIError(400, "prompt must not be empty", param="prompt")
    vocab = engine.model.config.vocab_size
    for p in ids:
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
    return ids


async def _run(server: Server, engine: Engine, request: Request, kind: str, prompts: list[list[int]],
               params: SamplingParams, body: _Sampling):
    """Submit every prompt x n, then answer in one JSON body or as a Server-Sent Events stream."""
    if len(prompts) * body.n > server.max_seqs_per_request:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} = {len(prompts) * body.n} sequences; one request "
                            f"may ask for at most {server.max_seqs_per_request}", param="n")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[Sequence, Event]] = asyncio.Queue()
    started = time.perf_counter()
    try:
        # In a thread: compiling a large grammar takes a while.
        sequences = await asyncio.to_thread(engine.submit, prompts, params, body.n,
                                            notify=lambda s, e: loop.call_soon_threadsafe(events.put_nowait, (s, e)))
    except InvalidConstraint as e:
        raise APIError(400, f"{_constraint_field(body)}: {e}", param=_constraint_field(body)) from None
    except ContextTooLong as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except Draining as e:
        raise APIError(503, str(e), type="service_unavailable", code="shutting_down") from None
    index = {seq.id: i for i, seq in enumerate(sequences)}
    server.prompt_tokens.inc(sum(len(seq.prompt_ids) for seq in sequences))
    response_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
    render = _Render(engine, server.model_name, kind, response_id, params, sequences, body.n)

    async def updates():
        """(sequence, event) until every sequence has finished."""
        open_, answered = len(sequences), set()
        while open_:
            seq, event = await events.get()
            if seq.id not in answered and seq.first_token_at is not None:  # a failed one has no first token
                answered.add(seq.id)
                server.ttft.observe(seq.first_token_at - seq.submitted)
            server.generated_tokens.inc(len(event.tokens))
            if event.finish_reason is not None:
                open_ -= 1
            yield seq, event
        server.latency.observe(time.perf_counter() - started)

    if not body.stream:
        return await _whole(engine, request, sequences, updates(), render, index)

    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def stream():
        try:
            for chunk in render.stream_start():
                yield f"data: {json.dumps(chunk)}\n\n"
            async for seq, event in updates():
                if event.error is not None:  # OpenAI streams report a failure as an error object
                    yield _error_chunk(f"generation failed: {event.error}", "engine_error")
                    break
                for chunk in render.stream_event(index[seq.id], event):
                    yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                yield f"data: {json.dumps(render.usage_chunk())}\n\n"
        except Exception as e:  # past the first byte there is no status to change: say it in the stream
            logger.exception("stream failed")
            yield _error_chunk(f"internal server error ({type(e).__name__})", "internal_error")
        finally:  # the client went away (or we are done): free the slots now
            engine.cancel(sequences)
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


def _error_chunk(message: str, code: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': code}})}\n\n"


async def _whole(engine: Engine, request: Request, sequences: list[Sequence], updates, render: _Render,
                 index: dict[int, int]) -> dict:
    """Collect a non-streamed answer; a client that leaves meanwhile cancels its sequences."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        async for seq, event in _until(updates, gone):
            if event.error is not None:
                raise APIError(500, f"generation failed: {event.error}", type="server_error", code="engine_error")
            render.add(index[seq.id], event)
    finally:
        gone.cancel()
        engine.cancel(sequences)
    return render.whole()


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


async def _until(updates, gone: asyncio.Future):
    """The items of `updates` until `gone` completes (then it stops early)."""
    iterator = updates.__aiter__()
    while True:
        item = asyncio.ensure_future(iterator.__anext__())
        await asyncio.wait({item, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not item.done():
            item.cancel()
            return
        try:
            yield item.result()
        except StopAsyncIteration:
            return


class _Render:
    """Builds OpenAI response bodies and stream chunks from engine events."""

    def __init__(self, engine: Engine, model: str, kind: str, response_id: str, params: SamplingParams,
                 sequences: list[Sequence], n: int):
        self.tok, self.model, self.kind, self.id, self.params = engine.tokenizer, model, kind, response_id, params
        self.sequences, self.n = sequences, n  # choice i is sequences[i]; the n of one prompt are adjacent
        self.created = int(time.time())
        count = len(sequences)
        self.texts = [""] * count
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count

    def add(self, i: int, event: Event) -> None:
        self.texts[i] += event.text
        self.tokens[i] += event.tokens
        self.logprobs[i] += event.logprobs
        if event.finish_reason is not None:
            self.finish[i] = event.finish_reason

    def _prompt(self, i: int) -> list[int]:
        return self.sequences[i].prompt_ids

    def _usage(self) -> dict:
        prompt = sum(len(seq.prompt_ids) for seq in self.sequences[:: self.n])  # each prompt once, whatever n is
        completion = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _token_text(self, token: int) -> str:
        return self.tok.decode([token])

    def _completion_logprobs(self, i: int, logprobs: list[TokenLogprob], offset: int, echo: bool) -> dict:
        entries: list[TokenLogprob | None] = []
        tokens: list[int] = []
        if echo:
            prompt = self._prompt(i)
            entries += self.sequences[i].prompt_logprobs  # the engine fills these for echo + logprobs
            tokens += prompt
        entries += logprobs
        tokens += [e.token for e in logprobs]
        text_offset, position = [], offset
        for token in tokens:
            text_offset.append(position)
            position += len(self._token_text(token))
        return {
            "tokens": [self._token_text(t) for t in tokens],
            "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [{self._token_text(t): lp for t, lp in e.top} if e else None for e in entries],
            "text_offset": text_offset,
        }


    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                            for e in logprobs]}

    def whole(self) -> dict:
        choices = []
        for i in range(len(self.texts)):
            if self.kind == "chat.completion":
                choices.append({"index": i, "message": {"role": "assistant", "content": self.texts[i]},
                                "logprobs": self._chat_logprobs(self.logprobs[i]) if self.params.logprobs is not None else None,
                                "finish_reason": self.finish[i]})
            else:
                prefix = self.tok.decode(self._prompt(i)) if self.params.echo else ""
                logprobs = None
                if self.params.logprobs is not None:
                    logprobs = self._completion_logprobs(i, self.logprobs[i], 0, self.params.echo)
                choices.append({"index": i, "text": prefix + self.texts[i], "logprobs": logprobs,
                                "finish_reason": self.finish[i]})
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage()}

    def _chunk(self, choices: list[dict]) -> dict:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def stream_start(self) -> list[dict]:
        if self.kind == "chat.completion":
            return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]) for i in range(len(self.texts))]
        if self.params.echo:
            return [self._chunk([{"index": i, "text": self.tok.decode(self._prompt(i)), "logprobs": None,
                                  "finish_reason": None}]) for i in range(len(self.texts))]
        return []

    def stream_event(self, i: int, event: Event) -> list[dict]:
        offset = len(self.texts[i])
        self.add(i, event)
        if not event.text and not event.finish_reason and not (event.logprobs and self.kind != "chat.completion"):
            return []
        if self.kind == "chat.completion":
            choice = {"index": i, "delta": {"content": event.text} if event.text else {},
                      "logprobs": self._chat_logprobs(event.logprobs) if self.params.logprobs is not None else None,
                      "finish_reason": event.finish_reason}
        else:
            logprobs = self._completion_logprobs(i, event.logprobs, offset, False) \
                if self.params.logprobs is not None else None
            choice = {"index": i, "text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}
        return [self._chunk([choice])]

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self._usage()}
