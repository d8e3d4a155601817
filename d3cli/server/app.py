"""The HTTP side of `d3 serve`: Starlette routes on uvicorn, the model loaded in the background, one decode worker.

    POST /v1/chat/completions   chat messages through the tokenizer's chat template
    POST /v1/completions        a raw prompt
    GET  /v1/models             the one model served
    GET  /health                503 while the model loads, 200 once it answers

Bodies are read with a size limit and checked by `protocol`; a checked request becomes a `worker.Job`. Its events
cross from the worker thread to the event loop with `loop.call_soon_threadsafe` into the request's own
`asyncio.Queue`. While a request waits or streams, a task listens for the client's disconnect and cancels its job,
so the worker stops that decode at the next token. Every request ends in one log record (method, path, status,
tokens, mean layers, tokens/s) handed to the `log` function the command gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from d3cli.base.errors import UserError
from d3cli.core.session.settings import DecodeSettings
from d3cli.server import protocol
from d3cli.server.protocol import CHAT, COMPLETION, ApiError, ChunkStream, CompletionRequest, ResponseIdentity
from d3cli.server.worker import Job, JobEnd, QueueFull, Worker

MAX_BODY_BYTES = 2 * 1024 * 1024
DRAIN_LIMIT_BYTES = 16 * MAX_BODY_BYTES  # an oversized body is read (and dropped) up to here, so the 413 arrives
GRACEFUL_SHUTDOWN_S = 5


@dataclass(frozen=True)
class ServeConfig:
    """What `d3 serve` was asked for."""

    model_options: object  # loader.ModelOptions
    settings: DecodeSettings  # the server's defaults; each request may change its reply's fields
    api_key: str | None = None
    queue_size: int = 16
    max_batch: int = 1  # greedy requests waiting together with the same settings decoded as one batch, up to this
    max_body_bytes: int = MAX_BODY_BYTES


class ServerState:
    """The model (None while loading), its worker, and what requests need of it."""

    def __init__(self, config: ServeConfig, log: Callable[[dict], None]):
        from d3cli.core.model.loader import EMBEDDED_NAME

        self.config = config
        self.log = log
        requested = config.model_options.model
        self.model_id = requested if requested is not None else EMBEDDED_NAME
        self.model_ids: tuple[str, ...] = (self.model_id,)
        self.created = int(time.time())
        self.loaded = None
        self.worker: Worker | None = None
        self.tokenizer = None  # the request side's own copy: a fast tokenizer must not be used from two threads
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.on_load_failed: Callable[[], None] = lambda: None

    def load(self) -> None:
        """Load the model and start the worker (on a background thread); a failure is kept as one line and the
        server is told to stop."""
        started = time.perf_counter()
        try:
            from d3cli.core.session.front_door import open_model

            loaded = open_model(self.config.model_options, self.config.settings).loaded  # its settings fit the model
            self.tokenizer = copy.deepcopy(loaded.tokenizer)
            self.model_ids = tuple(dict.fromkeys((self.model_id, loaded.name)))
            self.worker = Worker(loaded, self.config.queue_size, max_batch=self.config.max_batch)
            self.worker.start()
            self.loaded = loaded
        except UserError as error:
            self.load_error = str(error)
        except Exception as error:  # noqa: BLE001 - a model that cannot load is reported, not raised on a thread
            self.load_error = f"the model could not be loaded: {type(error).__name__}: {error}"
        if self.load_error is not None:
            self.on_load_failed()
            return
        self.ready.set()
        self.log({"event": "ready", "model": self.model_id, "num_layers": self.num_layers,
                  "load_s": round(time.perf_counter() - started, 2)})

    @property
    def num_layers(self) -> int:
        from d3cli.core.model.model_facts import num_decoder_layers

        return num_decoder_layers(self.loaded.model)

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        """The request's token ids (chat template or raw text), checked against the model's context."""
        from d3cli.core.model.model_facts import context_length
        from d3cli.core.text.prompts import check_fits_context, encode_chat, encode_prompt

        param = "messages" if request.endpoint == CHAT else "prompt"
        try:
            if request.endpoint == CHAT:
                token_ids = encode_chat(self.tokenizer, list(request.messages))
            else:
                token_ids = encode_prompt(self.tokenizer, request.prompt, chat=False)
        except UserError as error:
            raise ApiError(400, f"{param}: {error}", param=param, code="invalid_value") from None
        if not token_ids:
            raise ApiError(400, f"{param}: the prompt has no tokens", param=param, code="invalid_value")
        try:
            check_fits_context(len(token_ids), context_length(self.loaded.model))
        except UserError as error:
            raise ApiError(400, f"{param}: {error}", param=param, code="context_length_exceeded") from None
        return token_ids

    def plan(self, request: CompletionRequest):
        """The request's DecodePlan; a schedule that does not fit the model is the request's error (400)."""
        from d3cli.core.session.plan import plan_for

        try:
            return plan_for(self.loaded, request.settings)
        except UserError as error:
            raise protocol.schedule_error(error, request) from None

    def cancel_all(self) -> None:
        if self.worker is not None:
            self.worker.cancel_running()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()


# --- requests -------------------------------------------------------------------------------------------------------


def json_error(error: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def endpoint(handler):
    """A route whose ApiError becomes its error response and whose unexpected failure becomes a 500, never a crash."""

    async def route(request: Request):
        log = request.scope.setdefault("d3", {})
        try:
            return await handler(request)
        except ApiError as error:
            log["error"] = error.message
            return json_error(error, {"Retry-After": "1"} if error.status == 503 else None)
        except Exception as error:  # noqa: BLE001 - a bug must not take the server down
            if os.environ.get("D3_DEBUG"):
                raise
            log["error"] = f"internal error: {type(error).__name__}: {error}"
            return json_error(ApiError(500, log["error"], code="internal_error"))

    return route


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or a 413 when it is over `limit` bytes (what is sent beyond it is read and dropped, up to a
    point, so that the client gets the answer instead of a reset connection)."""
    declared = request.headers.get("content-length", "")
    chunks: list[bytes] = []
    size = 0
    too_large = declared.isdigit() and int(declared) > limit
    if not too_large or int(declared) <= DRAIN_LIMIT_BYTES:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_large = True
                chunks.clear()
                if size > DRAIN_LIMIT_BYTES:
                    break
            elif not too_large:
                chunks.append(chunk)
    if too_large:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    return b"".join(chunks)


async def watch_disconnect(receive, job: Job) -> None:
    """Cancel `job` when the client goes away (its connection closes before the response is complete)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def job_events(loop: asyncio.AbstractEventLoop, token_ids, plan):
    """A job and the asyncio queue its events arrive in."""
    events: asyncio.Queue = asyncio.Queue()

    def deliver(item) -> None:
        loop.call_soon_threadsafe(events.put_nowait, item)

    return Job(token_ids, plan, deliver), events


def log_reply(log: dict, reply, prompt_tokens: int, end: JobEnd | None, disconnected: bool, batch_size: int = 1
              ) -> None:
    if batch_size > 1:
        log["batch"] = batch_size
    log.update(prompt_tokens=prompt_tokens, completion_tokens=reply.generated_tokens,
               mean_layers=round(reply.mean_layers, 2), tokens_per_s=round(reply.tokens_per_s, 2),
               finish_reason=protocol.finish_reason(reply) if end is not None and end.reason == "done" else None)
    if disconnected:
        log["disconnected"] = True
        log["steps_after_cancel"] = end.steps_after_cancel if end is not None else None
    if end is not None and end.reason == "failed":
        log["error"] = end.error


def completions_route(endpoint_kind: str):
    @endpoint
    async def route(request: Request):
        state: ServerState = request.app.state.d3
        if state.loaded is None:
            raise ApiError(503, "the model is still loading: try again in a moment", code="model_loading")
        body = protocol.parse_json_body(await read_body(request, state.config.max_body_bytes))
        parsed = protocol.parse_request(endpoint_kind, body, state.config.settings, state.model_ids)
        token_ids = state.prompt_ids(parsed)
        plan = state.plan(parsed)
        job, events = job_events(asyncio.get_running_loop(), token_ids, plan)
        try:
            state.worker.submit(job)
        except QueueFull:
            raise ApiError(503, f"the server is busy: {state.config.queue_size} requests are already waiting",
                           code="queue_full") from None
        weights = state.loaded.weights.kind if state.loaded.weights is not None else None
        identity = ResponseIdentity.new(endpoint_kind, state.model_id, weights)
        watcher = asyncio.create_task(watch_disconnect(request.receive, job))
        chunks = ChunkStream(parsed, identity, plan, len(token_ids))
        log = request.scope["d3"]
        try:
            first = await events.get()
        except BaseException:
            job.cancel()
            watcher.cancel()
            raise
        if isinstance(first, JobEnd):  # failed or cancelled before its first token
            gone = saw_disconnect(watcher)
            watcher.cancel()
            log_reply(log, chunks.reply, len(token_ids), first, gone, job.batch_size)
            raise end_error(first, gone)
        if parsed.stream:
            return EventStream(first, events, chunks, job, watcher, log)
        return await whole_reply(first, events, chunks, job, watcher, log)

    return route


def end_error(end: JobEnd, client_gone: bool = False) -> ApiError:
    if end.reason == "failed":
        return ApiError(500, f"the decode failed: {end.error}", code="decode_failed")
    if client_gone:
        return ApiError(499, "the client disconnected", code="client_disconnected")
    return ApiError(503, "the request was cancelled: the server is shutting down", code="cancelled")


def saw_disconnect(watcher: asyncio.Task) -> bool:
    """Whether the disconnect watcher has seen the client go (it ends only then, unless it was cancelled)."""
    return watcher.done() and not watcher.cancelled()


async def whole_reply(first, events: asyncio.Queue, chunks: ChunkStream, job: Job, watcher, log: dict):
    """Collect the reply's events into one response object."""
    item = first
    try:
        while not isinstance(item, JobEnd):
            chunks.reply.add(item)
            item = await events.get()
    finally:
        job.cancel()  # a no-op once the job has ended; stops it when this handler is cancelled
        gone = saw_disconnect(watcher)
        watcher.cancel()
    log_reply(log, chunks.reply, chunks.prompt_tokens, item, disconnected=gone, batch_size=job.batch_size)
    if item.reason != "done":
        raise end_error(item, gone)
    return JSONResponse(protocol.completion_response(chunks.request.endpoint, chunks.identity, chunks.reply,
                                                     chunks.plan, chunks.prompt_tokens, job.batch_size))


class EventStream:
    """A streamed reply as server-sent events: one chunk per token as the worker makes it, the finish (and usage)
    chunk, `data: [DONE]`. A client that goes away cancels the job (its watcher, or a failed send)."""

    def __init__(self, first, events: asyncio.Queue, chunks: ChunkStream, job: Job, watcher, log: dict):
        self.first, self.events, self.chunks, self.job, self.watcher, self.log = first, events, chunks, job, watcher, log

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        item = self.first
        send_failed = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while not isinstance(item, JobEnd):
                data = b"".join(protocol.sse(chunk) for chunk in self.chunks.token(item))
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                item = await self.events.get()
            if item.reason == "done":
                tail = b"".join(protocol.sse(chunk) for chunk in self.chunks.finish(self.job.batch_size))
            else:
                tail = protocol.sse(end_error(item, saw_disconnect(self.watcher)).body())
            await send({"type": "http.response.body", "body": tail + protocol.DONE, "more_body": False})
        except OSError:  # the client went away while a chunk was sent
            send_failed = True
        finally:
            gone = send_failed or saw_disconnect(self.watcher) and isinstance(item, JobEnd) and item.reason != "done"
            self.job.cancel()  # a no-op once the job has ended
            self.watcher.cancel()
            if not isinstance(item, JobEnd):  # stopped early: wait for the worker to confirm, then log
                item = await wait_for_end(self.events)
                gone = True
            log_reply(self.log, self.chunks.reply, self.chunks.prompt_tokens, item, disconnected=gone,
                      batch_size=self.job.batch_size)


async def wait_for_end(events: asyncio.Queue, timeout_s: float = 30.0) -> JobEnd | None:
    """The JobEnd of a job that was cancelled (its remaining events dropped)."""
    async def next_end() -> JobEnd:
        while True:
            item = await events.get()
            if isinstance(item, JobEnd):
                return item

    try:
        return await asyncio.wait_for(next_end(), timeout_s)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        return None


@endpoint
async def models(request: Request):
    state: ServerState = request.app.state.d3
    return JSONResponse(protocol.models_response(state.model_id, state.created))


@endpoint
async def health(request: Request):
    state: ServerState = request.app.state.d3
    if state.loaded is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ok", "model": state.model_id, "queued": state.worker.waiting})


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    request.scope.setdefault("d3", {})["error"] = message.get(error.status_code, str(error.detail))
    return json_error(ApiError(error.status_code, request.scope["d3"]["error"], code="not_found"
                               if error.status_code == 404 else "method_not_allowed"))


class Gate:
    """The outermost layer: the API key check on /v1/, and one log record per request once its response ends."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope["d3"] = log = {}
        status = [None]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            key = self.state.config.api_key
            if key is not None and scope["path"].startswith("/v1/") and not authorized(scope, key):
                log["error"] = "missing or wrong API key"
                response = json_error(ApiError(401, "a valid API key is needed: send the header "
                                                    "'Authorization: Bearer <key>'", code="invalid_api_key"),
                                      {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            if scope["path"] != "/health" or status[0] != 200:  # a health poll every second would drown the log
                self.state.log({"event": "request", "method": scope["method"], "path": scope["path"],
                                "status": status[0], "time_s": round(time.perf_counter() - started, 3), **log})


def authorized(scope, key: str) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
    return False


def create_app(state: ServerState) -> Gate:
    """The ASGI app: its lifespan starts loading the model on a background thread and stops the worker at the end."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=state.load, name="d3-load", daemon=True).start()
        yield
        state.stop()

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/v1/chat/completions", completions_route(CHAT), methods=["POST"]),
            Route("/v1/completions", completions_route(COMPLETION), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.d3 = state
    return Gate(app, state)


# --- running --------------------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port); a port in use or a bad host is a UserError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UserError(f"cannot listen on host {host!r}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        if error.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise UserError(f"port {port} on {host} is already in use: pick another with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server, whose Ctrl-C also cancels the decode in progress (so streams end now, not at their end)."""

    def __init__(self, config, state: ServerState):
        super().__init__(config)
        self.d3_state = state

    def handle_exit(self, sig, frame) -> None:
        self.d3_state.cancel_all()
        super().handle_exit(sig, frame)


def serve(config: ServeConfig, sock: socket.socket, log: Callable[[dict], None]) -> None:
    """Serve until Ctrl-C (or SIGTERM): uvicorn starts answering at once, the model loads on a background thread,
    /health turns 200 when it is ready. A model that cannot load stops the server and is raised as a UserError."""
    state = ServerState(config, log)
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    uvicorn_config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="on",
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False)
    server = Server(uvicorn_config, state)

    def stop_server() -> None:
        server.should_exit = True

    state.on_load_failed = stop_server
    log({"event": "listening", "url": f"http://{shown_host}:{port}", "host": host, "port": port,
         "model": state.model_id})
    try:
        server.run(sockets=[sock])  # Ctrl-C comes out of here as KeyboardInterrupt (exit 130) once uvicorn has stopped
    finally:
        state.stop()
        if state.load_error is None:
            log({"event": "stopped"})
    if state.load_error is not None:
        raise UserError(state.load_error)

