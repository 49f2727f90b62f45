"""An OpenAI-compatible HTTP API (``ec2moe api``) in front of the end client or a local model.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (a clear
400 for a model without a chat template), ``GET /ec2moe/status`` (the live panel's JSON: plan,
link estimate, queue, TTFT/TPOT) and ``GET /`` (the page, :mod:`.page`). ``stream: true``
answers server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``), as OpenAI does.

Admission: at most ``queue_size`` requests are admitted at once (running + waiting for one of
the backend's ``workers``); one more is answered 429 at once, never queued without bound. A
client that disconnects (mid-stream or while waiting) cancels its generation at the next
token, and its admission slot (and, through the end client, its server session) is freed when
the generation stops.

Every response carries a top-level ``"ec2moe"`` object (clients ignore unknown keys): the plan
(split, resident experts per end layer, codec), bytes sent and received on the link, TTFT and
TPOT measured here, and the method of those figures.

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``; a malformed
body is a 400 whose message and ``param`` name the field.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import math
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

RECENT = 64  # requests the status panel's latency medians cover


class ApiError(Exception):
    """An error answered as OpenAI's error object with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class StopGeneration(Exception):  # noqa: N818 (a control signal, not an error)
    """Raised from ``on_token`` to end a generation early (a stop sequence or a client that
    went away); backends let it propagate after freeing what they hold."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Per-request sampling: ``temperature`` (0 = greedy), ``top_p`` (1 = off), ``seed``
    (None = the backend's own key)."""

    temperature: float
    top_p: float
    seed: int | None


class Tokenizer(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Backend(Protocol):
    """What the HTTP layer drives: one model, ``workers`` generations at a time.

    ``generate`` runs on a worker thread: it calls ``on_token(id)`` for each new token (which
    may raise :class:`StopGeneration`), fills ``ext`` (plan, bytes, ...) even when it stops
    early, and raises :class:`ApiError` for requests it cannot serve.
    """

    model_name: str
    vocab_size: int
    max_seq_len: int
    workers: int
    tokenizer: Tokenizer
    chat_template: Callable[[list[dict]], list[int]] | None
    eos_ids: tuple[int, ...]  # a generated one ends the text (finish_reason "stop")

    def check(self, sampling: Sampling) -> None: ...

    def generate(self, prompt: list[int], max_new_tokens: int, sampling: Sampling,
                 on_token: Callable[[int], None], ext: dict) -> None: ...

    def status(self) -> dict: ...


# ----- request bodies -------------------------------------------------------------------------

class _Sampled(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)


class CompletionRequest(_Sampled):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ----- text helpers ---------------------------------------------------------------------------

class _TextStream:
    """Token ids -> text pieces as they become final: a byte tokenizer's multi-byte character
    split over tokens decodes to U+FFFD until its last byte arrives, so trailing U+FFFD is
    held back; stop sequences cut the text before them, and up to the longest stop minus one
    character is held back so a stop split over tokens is still found."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters emitted
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                return self._take(text[:at])
        stable = text.rstrip("\ufffd")
        return self._take(stable[:max(len(stable) - self.hold, self.sent)])

    def finish(self) -> str:
        """The held-back rest (nothing after a stop)."""
        return "" if self.stopped else self._take(self.tokenizer.decode(self.ids))

    def _take(self, text: str) -> str:
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return piece


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, f"stop: at most 4 non-empty strings, got {stops!r}", "stop")
    return stops


def _prompt_ids(prompt: str | list, backend: Backend) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request ({len(prompt)} given; n=1 "
                                "and no batching)", "prompt")
        prompt = prompt[0]
    ids = ([int(i) for i in backend.tokenizer.encode(prompt)] if isinstance(prompt, str)
           else list(prompt))
    v = backend.vocab_size
    if not ids:
        raise ApiError(400, "prompt: empty; give text or token ids", "prompt")
    bad = [i for i in ids if not 0 <= i < v]
    if bad:
        raise ApiError(400, f"prompt: token ids {bad[:8]} outside the vocabulary [0, {v}) of "
                            f"{backend.model_name}", "prompt")
    return ids


def _new_tokens(requested: int | None, prompt_len: int, limit: int, default: int | None,
                param: str) -> int:
    room = limit - prompt_len
    if room < 1:
        raise ApiError(400, f"prompt: {prompt_len} tokens leave no room in the model's "
                            f"max_seq_len {limit}; shorten it to at most {limit - 1} tokens",
                       "prompt", code="context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ApiError(400, f"{param}: {requested} plus the {prompt_len}-token prompt exceeds "
                            f"the model's max_seq_len {limit}; at most {room} new tokens fit",
                       param, code="context_length_exceeded")
    return requested


# ----- admission and jobs ---------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Job:
    """One admitted request: its inputs, its cancellation flag and what it produced."""

    prompt: list[int]
    max_new: int
    sampling: Sampling
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    admitted: float = dataclasses.field(default_factory=time.monotonic)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    times: list = dataclasses.field(default_factory=list)
    tokens: int = 0
    text: list = dataclasses.field(default_factory=list)
    finish: str = "length"
    ext: dict = dataclasses.field(default_factory=dict)
    error: ApiError | None = None
    started: float | None = None

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def latency(self) -> dict:
        t0 = self.started
        ttft = self.times[0] - t0 if self.times else None
        tpot = ((self.times[-1] - self.times[0]) / (len(self.times) - 1)
                if len(self.times) > 1 else None)
        return {"queue_s": (t0 or time.monotonic()) - self.admitted, "ttft_s": ttft,
                "tpot_s": tpot}


class _Admission:
    """The bounded queue: ``limit`` jobs admitted at once, the backend's workers run them."""

    def __init__(self, backend: Backend, limit: int):
        if limit < 1:
            raise ValueError(f"queue size {limit} must be >= 1")
        self.backend, self.limit = backend, limit
        self.pool = concurrent.futures.ThreadPoolExecutor(backend.workers, "ec2moe-api")
        self.lock = threading.Lock()
        self.admitted = self.running = 0
        self.counts = collections.Counter()
        self.recent: collections.deque = collections.deque(maxlen=RECENT)
        self.jobs: set[_Job] = set()  # admitted, not yet finished

    def close(self) -> None:
        """Cancels every admitted job (each stops at its next token) and stops the workers."""
        with self.lock:
            for job in self.jobs:
                job.cancel.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: _Job) -> concurrent.futures.Future:
        """Admits ``job`` or raises a 429 :class:`ApiError`."""
        with self.lock:
            if self.admitted >= self.limit:
                self.counts["rejected_429"] += 1
                raise ApiError(429, f"the request queue is full ({self.limit} requests "
                                    "admitted); retry later", kind="rate_limit_error",
                               code="queue_full")
            self.admitted += 1
            self.jobs.add(job)
        return self.pool.submit(self._run, job)

    def _run(self, job: _Job) -> None:
        try:
            with self.lock:
                self.running += 1
            if not job.cancel.is_set():
                self._generate(job)
        finally:
            with self.lock:
                self.running -= 1
                self.admitted -= 1
                self.jobs.discard(job)
                outcome = ("cancelled" if job.cancel.is_set() else
                           "failed" if job.error else "served")
                self.counts[outcome] += 1
                if outcome == "served":
                    self.recent.append(job.latency())
            job.emit(None)

    def _generate(self, job: _Job) -> None:
        stream = _TextStream(self.backend.tokenizer, job.stops)
        job.started = time.monotonic()

        def on_token(t: int) -> None:
            if job.cancel.is_set():
                raise StopGeneration("client disconnected")
            job.times.append(time.monotonic())
            job.tokens += 1
            if int(t) in self.backend.eos_ids:
                job.finish = "stop"
                raise StopGeneration("end of sequence")
            piece = stream.push(int(t))
            if piece:
                job.text.append(piece)
                job.emit(piece)
            if stream.stopped:
                job.finish = "stop"
                raise StopGeneration("stop sequence")

        try:
            self.backend.generate(job.prompt, job.max_new, job.sampling, on_token, job.ext)
        except StopGeneration:
            pass
        except ApiError as e:
            job.error = e
        except Exception as e:  # a lost cloud, a refused plan: the request fails, not the server
            job.error = ApiError(503, f"generation failed: {type(e).__name__}: {e}",
                                 kind="server_error", code="backend_error")
        rest = stream.finish()
        if rest:
            job.text.append(rest)
            job.emit(rest)

    def status(self) -> dict:
        with self.lock:
            recent = list(self.recent)
            queue = {"limit": self.limit, "admitted": self.admitted, "running": self.running,
                     "waiting": self.admitted - self.running, "workers": self.backend.workers,
                     **{k: self.counts[k] for k in
                        ("served", "cancelled", "failed", "rejected_429")}}

        def median(key):
            xs = [r[key] for r in recent if r[key] is not None]
            return statistics.median(xs) if xs else None

        latency = {"last": recent[-1] if recent else None, "requests": len(recent),
                   **{f"median_{k}": median(k) for k in ("queue_s", "ttft_s", "tpot_s")}}
        return {"queue": queue, "latency": latency}


# ----- responses ------------------------------------------------------------------------------

def _usage(job: _Job) -> dict:
    p = len(job.prompt)
    return {"prompt_tokens": p, "completion_tokens": job.tokens,
            "total_tokens": p + job.tokens}


def _extension(job: _Job) -> dict:
    return {**job.ext, **job.latency(), "tokens": job.tokens,
            "timing_method": "measured in this process: from the start of the generation to "
                             "each token's arrival (queue wait excluded)"}


def _choice(chat: bool, text: str, finish: str | None, stream: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    key = "delta" if stream else "message"
    body = {"role": "assistant", "content": text} if not stream or text else {}
    return {"index": 0, key: body, "logprobs": None, "finish_reason": finish}


def _envelope(chat: bool, stream: bool, rid: str, created: int, model: str) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else \
        "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model}


def _watch_disconnect(request: Request, job: _Job) -> asyncio.Task:
    """A task that cancels ``job`` when the client goes away (the body is already read, so
    ``receive`` only returns at a disconnect)."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel.set()

    return asyncio.create_task(watch())


async def _respond(admission: _Admission, request: Request, job: _Job, chat: bool,
                   stream: bool, model: str, include_usage: bool):
    future = admission.submit(job)
    watcher = _watch_disconnect(request, job)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    head = _envelope(chat, stream, rid, created, model)
    if not stream:
        try:
            await asyncio.wrap_future(future)
        finally:
            watcher.cancel()
        if job.error is not None:
            raise job.error
        return {**head, "choices": [_choice(chat, "".join(job.text), job.finish, False)],
                "usage": _usage(job), "ec2moe": _extension(job)}

    async def events():
        try:
            if chat:
                yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                          "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            while (piece := await job.events.get()) is not None:
                yield _sse({**head, "choices": [_choice(chat, piece, None, True)]})
            if job.error is not None:
                yield _sse(job.error.body())
            else:
                yield _sse({**head, "choices": [_choice(chat, "", job.finish, True)],
                            "ec2moe": _extension(job)})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(job)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a disconnect mid-stream closes this generator: stop at once
            watcher.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, allow_nan=False, default=_finite)}\n\n"


def _finite(x: Any) -> Any:
    f = float(x)
    return f if math.isfinite(f) else None


# ----- the app --------------------------------------------------------------------------------

def _field_error(exc: RequestValidationError) -> ApiError:
    """The first validation error as a 400 naming the field (``messages.0.role``)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid body"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # pydantic tags union members (str | list[int]) into the location: drop the tags.
    loc = [p for p in loc if not p.startswith(("str", "list[", "int", "function-"))]
    field = ".".join(loc) or "body"
    if first.get("type") == "json_invalid":
        field = "body"  # the location is a character offset, not a field
        message = f"the body is not valid JSON ({first.get('msg')})"
    elif first.get("type") == "extra_forbidden":
        message = f"{field}: unknown or unsupported field"
    else:
        message = f"{field}: {first.get('msg')}"
        if "input" in first and first.get("type") != "missing":
            message += f" (got {json.dumps(first['input'], default=str)[:80]})"
    more = len(errors) - 1
    return ApiError(400, message + (f"; and {more} more error(s)" if more > 0 else ""),
                    None if field == "body" else field)


def create_app(backend: Backend, *, queue_size: int = 8, page_html: str | None = None,
               info: dict | None = None) -> FastAPI:
    """The FastAPI app of ``backend`` with a bounded queue of ``queue_size`` requests.

    Args:
      backend: :class:`~.api_backends.LocalBackend` or
        :class:`~.api_backends.RemoteBackend` (or another :class:`Backend`).
      queue_size: requests admitted at once (running + waiting); more are answered 429.
      page_html: the page served at ``/`` (default :data:`.page.PAGE`).
      info: static facts shown by ``/ec2moe/status`` (workdir, where the cloud is).

    Raises:
      ValueError: ``queue_size < 1``.
    """
    if page_html is None:
        from ec2moe_jax.serving.page import PAGE as page_html
    admission = _Admission(backend, queue_size)
    app = FastAPI(title="ec2moe: OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.admission = admission

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        e = _field_error(exc)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        e = ApiError(exc.status_code, str(exc.detail), kind="invalid_request_error")
        return JSONResponse(e.body(), status_code=exc.status_code)

    def model_card() -> dict:
        return {"id": backend.model_name, "object": "model", "created": 0, "owned_by": "ec2moe"}

    def check_model(name: str) -> None:
        if name != backend.model_name:
            raise ApiError(404, f"model: {name!r} is not served here; this server serves "
                                f"{backend.model_name!r} (GET /v1/models)", "model",
                           code="model_not_found")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        check_model(name)
        return model_card()

    def start(req: _Sampled, prompt: list[int], requested: int | None, param: str,
              default: int | None) -> _Job:
        check_model(req.model)
        sampling = req.sampling()
        backend.check(sampling)
        n = _new_tokens(requested, len(prompt), backend.max_seq_len, default, param)
        return _Job(prompt, n, sampling, _stops(req.stop), asyncio.get_running_loop(),
                    asyncio.Queue())

    def usage_wanted(req: _Sampled) -> bool:
        return bool((req.stream_options or {}).get("include_usage"))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        # OpenAI's completions default is 16 new tokens.
        job = start(req, _prompt_ids(req.prompt, backend), req.max_tokens, "max_tokens", 16)
        return await _respond(admission, request, job, False, req.stream, req.model,
                              usage_wanted(req))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        if backend.chat_template is None:
            raise ApiError(400, f"model {backend.model_name!r} has no chat template (a "
                                "byte-level model trained by `ec2moe train` has no roles or "
                                "special tokens; an imported one needs chat_template in its "
                                "tokenizer_config.json or a chat_template.jinja); use "
                                "/v1/completions with a text prompt",
                           "messages", code="no_chat_template")
        prompt = _prompt_ids(backend.chat_template([m.model_dump() for m in req.messages]),
                             backend)
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        job = start(req, prompt, req.max_completion_tokens or req.max_tokens, param, None)
        return await _respond(admission, request, job, True, req.stream, req.model,
                              usage_wanted(req))

    @app.get("/ec2moe/status")
    async def status():
        return {"model": backend.model_name, "max_seq_len": backend.max_seq_len,
                **(info or {}), **backend.status(), **admission.status(), "time": time.time()}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app



def run_http(app: FastAPI, host: str, port: int, *, ready_file: str | None = None) -> None:
    """Serves ``app`` with uvicorn until SIGINT/SIGTERM; prints ``listening on
    http://HOST:PORT`` (and writes the port to ``ready_file``, atomically) once it accepts
    connections. ``port=0`` binds a free port. On exit, running generations are cancelled.

    Raises:
      ValueError: the address cannot be bound (the message names it).
    """
    import os
    import socket

    import uvicorn

    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port "
                         "(0: a free one)") from None
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=30))

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            print(f"listening on http://{host}:{bound}", flush=True)
            if ready_file:
                with open(ready_file + ".tmp", "w") as f:
                    f.write(str(bound))
                os.replace(ready_file + ".tmp", ready_file)
        await task

    try:
        asyncio.run(serve())
    finally:
        app.state.admission.close()
