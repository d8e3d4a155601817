"""`d3 serve`'s routes: a checked request becomes a `worker.Job`, whose events cross from the worker thread to the
event loop (`loop.call_soon_threadsafe` into the request's own `asyncio.Queue`) and leave as one JSON response or a
stream of server-sent events. While a request waits or streams, a task listens for the client's disconnect and
cancels its job, so the worker stops that decode at the next token. Every request's log record is filled here and
written by the app's gate.
"""

from __future__ import annotations

import asyncio
import os

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from d3cli.core.decode.results import weights_fields
from d3cli.server import protocol, responses
from d3cli.server.protocol import ApiError
from d3cli.server.responses import ChunkStream, ResponseIdentity
from d3cli.server.state import MAX_BODY_BYTES, ServerState
from d3cli.server.worker import Job, JobEnd, QueueFull

DRAIN_LIMIT_BYTES = 16 * MAX_BODY_BYTES  # an oversized body is read (and dropped) up to here, so the 413 arrives


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


def log_reply(log: dict, reply, prompt_tokens: int, end: JobEnd | None, disconnected: bool, batch_size: int = 1,
              cached_tokens: int = 0) -> None:
    if batch_size > 1:
        log["batch"] = batch_size
    if cached_tokens:
        log["cached_tokens"] = cached_tokens
    log.update(prompt_tokens=prompt_tokens, completion_tokens=reply.generated_tokens,
               mean_layers=round(reply.mean_layers, 2), tokens_per_s=round(reply.tokens_per_s, 2),
               finish_reason=responses.finish_reason(reply) if end is not None and end.reason == "done" else None)
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
        identity = ResponseIdentity.new(endpoint_kind, state.model_id, weights_fields(state.loaded.weights))
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
    log_reply(log, chunks.reply, chunks.prompt_tokens, item, disconnected=gone, batch_size=job.batch_size,
              cached_tokens=job.cached_tokens)
    if item.reason != "done":
        raise end_error(item, gone)
    return JSONResponse(responses.completion_response(chunks.request.endpoint, chunks.identity, chunks.reply,
                                                     chunks.plan, chunks.prompt_tokens, job.batch_size,
                                                     job.cached_tokens))


class EventStream:
    """A streamed reply as server-sent events: one chunk per token as the worker makes it, the finish (and usage)
    chunk, `data: [DONE]`. A client that goes away cancels the job (its watcher, or a failed send)."""

    def __init__(self, first, events: asyncio.Queue, chunks: ChunkStream, job: Job, watcher, log: dict):
        self.first, self.events, self.chunks = first, events, chunks
        self.job, self.watcher, self.log = job, watcher, log

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        item = self.first
        send_failed = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while not isinstance(item, JobEnd):
                data = b"".join(responses.sse(chunk) for chunk in self.chunks.token(item))
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                item = await self.events.get()
            if item.reason == "done":
                finish = self.chunks.finish(self.job.batch_size, self.job.cached_tokens)
                tail = b"".join(responses.sse(chunk) for chunk in finish)
            else:
                tail = responses.sse(end_error(item, saw_disconnect(self.watcher)).body())
            await send({"type": "http.response.body", "body": tail + responses.DONE, "more_body": False})
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
                      batch_size=self.job.batch_size, cached_tokens=self.job.cached_tokens)


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
    return JSONResponse(responses.models_response(state.model_id, state.created))


@endpoint
async def health(request: Request):
    state: ServerState = request.app.state.d3
    if state.loaded is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ok", "model": state.model_id, "queued": state.worker.waiting,
                         "num_layers": state.num_layers, "chat_template": state.chat_template})


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    request.scope.setdefault("d3", {})["error"] = message.get(error.status_code, str(error.detail))
    return json_error(ApiError(error.status_code, request.scope["d3"]["error"], code="not_found"
                               if error.status_code == 404 else "method_not_allowed"))
