"""What `d3 serve` holds between requests: its config, the model's session (None while it loads), the worker that
owns the model, and the two things every request needs of them: its token ids and its plan."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from d3cli.base.errors import UserError
from d3cli.core.model.loader import EMBEDDED_NAME, ModelOptions
from d3cli.core.model.model_facts import context_length, num_decoder_layers
from d3cli.core.session.front_door import Session, open_model
from d3cli.core.session.plan import DecodePlan
from d3cli.core.session.settings import DecodeSettings
from d3cli.core.text.prompts import check_fits_context, encode_chat, encode_prompt, has_chat_template
from d3cli.server import protocol
from d3cli.server.protocol import CHAT, ApiError, CompletionRequest
from d3cli.server.worker import Worker

MAX_BODY_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """What `d3 serve` was asked for."""

    model_options: ModelOptions
    settings: DecodeSettings  # the server's defaults; each request may change its reply's fields
    api_key: str | None = None
    queue_size: int = 16
    max_batch: int = 1  # greedy requests waiting together with the same settings decoded as one batch, up to this
    max_body_bytes: int = MAX_BODY_BYTES
    prompt_cache: bool = True  # a reply decoded alone keeps its cache for the next prompt with the same start


class ServerState:
    """The session (None while loading), its worker, and what requests need of them."""

    def __init__(self, config: ServeConfig, log: Callable[[dict], None]):
        self.config = config
        self.log = log
        requested = config.model_options.model
        self.model_id = requested if requested is not None else EMBEDDED_NAME
        self.model_ids: tuple[str, ...] = (self.model_id,)
        self.created = int(time.time())
        self.session: Session | None = None
        self.worker: Worker | None = None
        self.tokenizer = None  # the request side's own copy: a fast tokenizer must not be used from two threads
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.on_load_failed: Callable[[], None] = lambda: None

    @property
    def loaded(self):
        """The loaded model (None while loading)."""
        return self.session.loaded if self.session is not None else None

    def load(self) -> None:
        """Open the model and start the worker (on a background thread); a failure is kept as one line and the
        server is told to stop."""
        started = time.perf_counter()
        try:
            session = open_model(self.config.model_options, self.config.settings)  # its settings fit the model
            self.tokenizer = copy.deepcopy(session.tokenizer)
            self.model_ids = tuple(dict.fromkeys((self.model_id, session.name)))
            self.worker = Worker(session.loaded, self.config.queue_size, max_batch=self.config.max_batch,
                                 prompt_cache=self.config.prompt_cache)
            self.worker.start()
            self.session = session
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
    def chat_template(self) -> bool:
        """Whether the model's tokenizer has a chat template (what `d3 generate --server` does with a prompt)."""
        return has_chat_template(self.tokenizer)

    @property
    def num_layers(self) -> int:
        return num_decoder_layers(self.session.model)

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        """The request's token ids (chat template or raw text), checked against the model's context."""
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
            check_fits_context(len(token_ids), context_length(self.session.model))
        except UserError as error:
            raise ApiError(400, f"{param}: {error}", param=param, code="context_length_exceeded") from None
        return token_ids

    def plan(self, request: CompletionRequest) -> DecodePlan:
        """The request's DecodePlan (the session's own when the request changes nothing); a schedule that does not
        fit the model is the request's error (400)."""
        try:
            return self.session.plan_for(request.settings)
        except UserError as error:
            raise protocol.schedule_error(error, request) from None

    def cancel_all(self) -> None:
        if self.worker is not None:
            self.worker.cancel_running()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
