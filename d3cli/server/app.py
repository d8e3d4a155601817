"""The HTTP side of `d3 serve`: Starlette routes on uvicorn, the model loaded in the background, one decode worker.

    POST /v1/chat/completions   chat messages through the tokenizer's chat template
    POST /v1/completions        a raw prompt
    GET  /v1/models             the one model served
    GET  /health                503 while the model loads, 200 once it answers

Three modules, one job each:

    state.py    ServeConfig and ServerState: the session (opened through the front door on a background thread),
                the worker that owns the model, each request's token ids and plan
    routes.py   the routes: a checked request (protocol.py) becomes a worker Job; its events leave as one JSON
                response or a stream of server-sent events; a client that goes away cancels its job
    app.py      this file: the gate in front of the routes (the API key, one log record per request), the socket,
                uvicorn, and Ctrl-C
"""

from __future__ import annotations

import contextlib
import hmac
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from d3cli.base.errors import UserError
from d3cli.server.protocol import CHAT, COMPLETION, ApiError
from d3cli.server.routes import completions_route, health, http_error, json_error, models
from d3cli.server.state import ServeConfig, ServerState

GRACEFUL_SHUTDOWN_S = 5


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
