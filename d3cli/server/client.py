"""The other side of `d3 serve`: `d3 generate --server URL` and `d3 chat --server URL` send their prompts to a running
server of the same model and get back what a local run makes: the streamed tokens as `TokenEvent`s (each token
chunk's `d3` object: its id, layers, time) and, at the end, the reply's whole record (the last chunk's `d3` object:
every field of `d3 generate --json`). Standard library only, and no torch: a command that talks to a server starts
in about the time Python and the CLI take to import.

    RemoteModel.connect(url, model, api_key)   /health (waits while the model loads) and /v1/models: the server
                                               answers, takes the key, and serves the model asked for
    remote.stream(request) / reply(request)    one streamed request: events, then the record (RemoteReply)

Every mistake is one line (UserError): an unreachable URL, a refused key, another model, a server that drops the
connection mid-reply (`ServerDropped`, which carries what arrived so that --jsonl keeps it, marked unfinished).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import resource
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

from d3cli.base.errors import UserError
from d3cli.core.decode.results import Reply, TokenEvent
from d3cli.core.session.settings import DecodeSettings

CONNECT_TIMEOUT_S = 10.0
LOADING_WAIT_S = 600.0  # how long a client waits for a server whose model is still loading
UNFINISHED = "unfinished"  # the finish reason of a reply the server stopped sending
SCHEDULE_DEFAULTS = DecodeSettings()


def server_address(url: str) -> tuple[str, int, str]:
    """(host, port, the URL as shown) of `--server`: http://HOST:PORT, HOST:PORT or a bare port on this machine."""
    text = url.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    if "://" not in text:
        text = "http://" + text
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme != "http" or not parsed.hostname:
        raise UserError(f"--server takes a d3 server's address like http://127.0.0.1:8000, not {url!r}")
    try:
        port = parsed.port or 80
    except ValueError:
        raise UserError(f"--server {url!r} has no valid port") from None
    return parsed.hostname, port, f"http://{parsed.hostname}:{port}"


@dataclass
class RemoteReply:
    """A reply made by the server: the same `Reply` a local run collects, and its record (`generate --json`'s)."""

    reply: Reply
    record: dict

    @property
    def finished(self) -> bool:
        return self.reply.finish_reason != UNFINISHED


class ServerDropped(UserError):
    """The server stopped sending before the reply ended; `partial` holds what arrived."""

    def __init__(self, message: str, partial: RemoteReply):
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class RemoteRequest:
    """One prompt for the server: raw text or chat messages, and the settings to decode it with."""

    settings: DecodeSettings
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None


@dataclass
class RemoteModel:
    """A running `d3 serve`: where it is, the model it serves and what a request needs of it."""

    host: str
    port: int
    url: str
    name: str
    num_layers: int
    chat_template: bool
    api_key: str | None = None

    @classmethod
    def connect(cls, url: str, model: str | None, api_key: str | None = None) -> RemoteModel:
        """The server at `url`, checked: it answers (waiting while its model loads), takes `api_key` (default:
        D3_API_KEY) and serves `model` (None: whatever it serves; else the same id or the same local path)."""
        host, port, shown = server_address(url)
        key = api_key if api_key is not None else os.environ.get("D3_API_KEY") or None
        remote = cls(host, port, shown, "", 0, False, key)
        health = remote._wait_until_ready()
        served = remote._get("/v1/models")
        ids = [entry.get("id") for entry in served.get("data", []) if isinstance(entry, dict)]
        if model is not None and not same_model(model, ids):
            raise UserError(f"the server at {shown} serves {', '.join(map(str, ids)) or 'no model'}, not {model}: "
                            "start `d3 serve` with that model, or leave out --server")
        remote.name = str(ids[0] if ids else health.get("model"))
        remote.num_layers = int(health.get("num_layers") or 0)
        remote.chat_template = bool(health.get("chat_template"))
        return remote

    # --- requests -------------------------------------------------------------------------------------------

    def stream(self, request: RemoteRequest, on_event=None) -> RemoteReply:
        """Send `request` streamed; `on_event(TokenEvent)` sees each token as it arrives. Returns the reply and its
        record; raises ServerDropped (with what arrived) when the stream ends early."""
        endpoint, body = self.request_body(request)
        connection = self._connection(timeout=None)
        reply = Reply()
        started = time.perf_counter()
        try:
            connection.request("POST", endpoint, json.dumps(body), self._headers())
            response = connection.getresponse()
            if response.status != 200:
                raise UserError(self._error_line(response.status, response.read()))
            record = None
            for data in server_sent_events(response):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # the decode failed, or the server is shutting down
                    raise http.client.HTTPException(chunk["error"].get("message", "an error event"))
                extension = chunk.get("d3") or {}
                if "token_id" in extension:
                    event = TokenEvent(0, len(reply.token_ids), int(extension["token_id"]), chunk_text(chunk),
                                       int(extension["layers"]), float(extension["elapsed_s"]))
                    self._add(reply, event, on_event)
                if "layers_per_token" in extension:
                    record = extension
            if record is None:
                raise http.client.IncompleteRead(b"")
        except (OSError, http.client.HTTPException, ValueError) as error:
            reply.finish_reason = UNFINISHED
            reply.time_s = time.perf_counter() - started
            why = str(error) if isinstance(error, http.client.HTTPException) and str(error) else type(error).__name__
            raise ServerDropped(f"the server at {self.url} stopped sending after {reply.generated_tokens} tokens "
                                f"({why}): the reply is unfinished",
                                RemoteReply(reply, self.partial_record(reply))) from None
        finally:
            connection.close()
        # the reply's last token has no chunk of its own when it adds no text (an EOS): the record counts it
        for index in range(reply.generated_tokens, len(record["token_ids"])):
            self._add(reply, TokenEvent(0, index, int(record["token_ids"][index]), "",
                                        int(record["layers_per_token"][index]), float(record["time_s"])), on_event)
        reply.finish_reason = record.get("finish_reason")
        if reply.token_ids:
            reply.time_s = float(record["time_s"])
        return RemoteReply(reply, self.full_record(reply, record))

    def request_body(self, request: RemoteRequest) -> tuple[str, dict]:
        """The endpoint and JSON body of `request`: chat messages through the chat template (as a local run does
        when the model has one, unless --no-chat), else the raw prompt; every setting the user changed."""
        settings = request.settings
        body: dict = {"model": self.name, "stream": True, "stream_options": {"include_usage": True},
                      **settings_fields(settings)}
        chat = settings.chat if settings.chat is not None else self.chat_template
        if request.messages is None and not chat:
            return "/v1/completions", {**body, "prompt": request.prompt}
        system = [{"role": "system", "content": settings.system}] if settings.system else []
        messages = request.messages if request.messages is not None else ({"role": "user", "content": request.prompt},)
        return "/v1/chat/completions", {**body, "messages": [*system, *messages]}

    def full_record(self, reply: Reply, extension: dict) -> dict:
        """`d3 generate --json`'s record of a served reply: the server's `d3` object, the text, and this process's
        own load time (none: it loaded nothing) and peak memory; `server` says where the reply was made."""
        record = {"model": self.name, **{key: value for key, value in extension.items() if key != "batch_size"}}
        record["text"] = reply.text
        record.update(load_s=None, peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      server=self.url)
        return record

    def partial_record(self, reply: Reply) -> dict:
        """The record of a reply the server stopped sending: what arrived, marked unfinished."""
        mean = reply.mean_layers
        return {"model": self.name, "num_layers": self.num_layers, "generated_tokens": reply.generated_tokens,
                "text": reply.text, "token_ids": reply.token_ids, "layers_per_token": reply.layers_per_token,
                "mean_layers": round(mean, 4), "time_s": round(reply.time_s, 4), "finish_reason": UNFINISHED,
                "server": self.url}

    # --- HTTP -----------------------------------------------------------------------------------------------

    @staticmethod
    def _add(reply: Reply, event: TokenEvent, on_event) -> None:
        reply.add(event)
        if on_event is not None:
            on_event(event)

    def _connection(self, timeout: float | None = CONNECT_TIMEOUT_S) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _get(self, path: str) -> dict:
        connection = self._connection()
        try:
            connection.request("GET", path, headers=self._headers())
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise UserError(f"no d3 server answers at {self.url}: {reason} (start one with `d3 serve`, or leave "
                            "out --server)") from None
        finally:
            connection.close()
        if response.status == 503 and path == "/health":
            return {"status": "loading"}
        if response.status != 200:
            raise UserError(self._error_line(response.status, data))
        try:
            return json.loads(data)
        except ValueError:
            raise UserError(f"the server at {self.url} is not a d3 server (its {path} is not JSON)") from None

    def _wait_until_ready(self) -> dict:
        waited = time.monotonic()
        while True:
            health = self._get("/health")
            if health.get("status") == "ok":
                return health
            if time.monotonic() - waited > LOADING_WAIT_S:
                raise UserError(f"the server at {self.url} is still loading its model after {LOADING_WAIT_S:.0f} s")
            time.sleep(0.25)

    def _error_line(self, status: int, data: bytes) -> str:
        try:
            message = json.loads(data)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = data.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
        if status == 401:
            return (f"the server at {self.url} refused the API key ({message}): set D3_API_KEY to the key `d3 serve` "
                    "was started with")
        return f"the server at {self.url} answered {status}: {message}"


def same_model(requested: str, served: list) -> bool:
    """Whether a server's model ids name `requested`: the same id, or the same file or folder on this machine."""
    if requested in served:
        return True
    if os.path.exists(requested):
        mine = os.path.realpath(requested)
        return any(isinstance(name, str) and os.path.exists(name) and os.path.realpath(name) == mine
                   for name in served)
    return False


def settings_fields(settings: DecodeSettings) -> dict:
    """The request fields of `settings`: the reply's length and sampling always; D3's schedule fields only where
    they differ from d3's defaults, so that a served model's own calibration chooses the rest, as it does locally."""
    sampling = settings.sampling
    fields: dict = {"max_tokens": settings.max_new_tokens, "temperature": sampling.temperature,
                    "top_p": sampling.top_p, "top_k": sampling.top_k}
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    if settings.stop:
        fields["stop"] = list(settings.stop)
    for key in ("alpha", "min_layers", "warmup", "head", "tail", "skip_order", "bridges"):
        value = getattr(settings, key)
        if value is not None and value != getattr(SCHEDULE_DEFAULTS, key):
            fields[key] = value
    return fields


def check_local_only(settings: DecodeSettings) -> None:
    """Settings a server cannot take from a client: files on this machine."""
    if settings.profile is not None or settings.calibration is not None:
        raise UserError("--profile and --calibration name files on this machine: with --server the server's own "
                        "calibration is used (start `d3 serve` with them instead)")


def chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or [{}]
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


def server_sent_events(response) -> Iterator[str]:
    """The `data:` payloads of a text/event-stream response, one per event."""
    lines: list[str] = []
    while True:
        raw = response.readline()
        if not raw:
            if lines:
                raise http.client.IncompleteRead(b"")  # the connection closed inside an event
            return
        line = raw.decode("utf-8").rstrip("\r\n")
        if line == "":
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].lstrip(" "))


@dataclass
class RemoteTurn:
    """What a served turn needs before it is sent (the server fits the conversation to its context itself)."""

    messages: tuple[dict, ...]
    dropped_turns: int = 0


@dataclass
class RemoteConversation:
    """`d3 chat --server`: the conversation kept here, each reply made by the server from the whole conversation
    (the same interface as core/session/conversation.Conversation, which chat_session.ChatSession drives)."""

    remote: RemoteModel
    settings: DecodeSettings
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    last_record: dict | None = None

    def __post_init__(self) -> None:
        check_local_only(self.settings)
        if not self.remote.chat_template:
            raise UserError("d3 chat needs a model whose tokenizer has a chat template; the server's has none")

    @property
    def name(self) -> str:
        return self.remote.name

    @property
    def num_layers(self) -> int:
        return self.remote.num_layers

    def decode_plan(self, settings: DecodeSettings | None = None) -> None:
        """None: the server plans each reply (settings are checked when they are made, and by the server)."""
        if settings is not None:
            check_local_only(settings)
        return None

    def describe(self) -> str:
        fields = settings_fields(self.settings)
        asked = ", ".join(f"{key.replace('_', '-')} {value}" for key, value in fields.items()
                          if key in ("alpha", "min_layers", "warmup", "head", "tail", "skip_order", "bridges"))
        return (f"served by {self.remote.url}, {self.num_layers} layers; "
                + (asked if asked else "the server's schedule (its model's calibration, or d3's default)"))

    def reset(self) -> None:
        self.messages = []

    def set_system(self, system: str | None) -> None:
        self.system = system or None

    def plan(self, user_text: str) -> RemoteTurn:
        if not user_text.strip():
            raise UserError("the message is empty")
        return RemoteTurn((*self.messages, {"role": "user", "content": user_text}))

    def reply(self, user_text: str, on_event=None, plan: RemoteTurn | None = None) -> Reply:
        """The server's reply to the conversation plus `user_text`, added to the conversation. On Ctrl-C the partial
        reply is kept and GenerationInterrupted raised, as a local conversation does."""
        from d3cli.core.decode.results import GenerationInterrupted

        plan = plan or self.plan(user_text)
        request = RemoteRequest(dataclasses.replace(self.settings, system=self.system), messages=plan.messages)
        partial = Reply()

        def arrived(event: TokenEvent) -> None:
            partial.add(event)
            if on_event is not None:
                on_event(event)

        try:
            served = self.remote.stream(request, on_event=arrived)
        except KeyboardInterrupt:
            partial.finish_reason = "interrupted"
            self._keep(user_text, partial, self.remote.partial_record(partial) | {"finish_reason": "interrupted"})
            raise GenerationInterrupted([partial]) from None
        self._keep(user_text, served.reply, served.record)
        return served.reply

    def record(self, reply: Reply, plan: RemoteTurn) -> dict:
        return dict(self.last_record or {})

    def _keep(self, user_text: str, reply: Reply, record: dict) -> None:
        self.last_record = record
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply.text}]
