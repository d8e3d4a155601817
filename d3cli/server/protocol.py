"""The OpenAI API's requests as d3 serves them: request bodies checked into a `CompletionRequest`, mistakes into
OpenAI-style error objects. Pure: no torch, no web framework. Replies become responses in responses.py.

A request's settings start from the server's (its command line) and take the request's fields through
`settings.apply_options`, the function that reads a JSONL line's options, so a bad value is refused with the same
check and words as on the command line, and the error names the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from d3cli.base.errors import UserError
from d3cli.core.session.settings import DecodeSettings, apply_options, did_you_mean, json_type

CHAT, COMPLETION = "chat", "completion"

# D3's own settings a request may carry as extra body fields (validated like the command line).
D3_FIELDS = ("alpha", "min_layers", "warmup", "head", "tail", "skip_order", "bridges", "top_k")
# The OpenAI fields that map onto DecodeSettings, by the key apply_options knows them by.
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop"}
# Fields d3 cannot honour, with the values that ask for nothing (sent by many clients as defaults).
UNSUPPORTED = {
    "n": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "prediction": (None,),
}
UNSUPPORTED_REASONS = {
    "n": "d3 serve makes one reply per request; send n requests",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "logprobs": "log probabilities are not returned",
    "top_logprobs": "log probabilities are not returned",
    "echo": "echoing the prompt is not supported",
    "best_of": "best_of is not supported",
    "suffix": "suffix (insertion) is not supported",
    "frequency_penalty": "repetition penalties are not supported",
    "presence_penalty": "repetition penalties are not supported",
    "logit_bias": "logit_bias is not supported",
    "response_format": "only plain text replies are supported",
    "audio": "audio is not supported",
    "prediction": "predicted outputs are not supported",
}
# Accepted and ignored: they change nothing about a local reply.
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier", "modalities", "reasoning_effort", "verbosity", "web_search_options")
COMMON_FIELDS = ("model", "max_tokens", "stream", "stream_options", *SAMPLING_FIELDS, *D3_FIELDS)
ENDPOINT_FIELDS = {
    CHAT: ("messages", "max_completion_tokens", *COMMON_FIELDS),
    COMPLETION: ("prompt", *COMMON_FIELDS),
}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request answered with an HTTP error status and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_field(field: str, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message if message.startswith(field) else f"{field}: {message}", param=field, code=code)


@dataclass(frozen=True)
class CompletionRequest:
    """One checked request: what to decode (chat messages or a raw prompt) and how."""

    endpoint: str  # CHAT or COMPLETION
    settings: DecodeSettings  # the server's settings with the request's fields applied
    messages: tuple[dict, ...] = ()  # CHAT: {"role", "content"} with plain-text content
    prompt: str = ""  # COMPLETION
    stream: bool = False
    include_usage: bool = False
    d3_fields: tuple[str, ...] = ()  # which D3 fields the request set (to name one in a schedule error)


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object; anything else is a 400 that says what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {error.start})", code="invalid_json") from None
    if not text.strip():
        raise ApiError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as error:
        where = f" at line {error.lineno}, column {error.colno}" if hasattr(error, "lineno") else ""
        message = getattr(error, "msg", str(error))
        raise ApiError(400, f"the request body is not valid JSON ({message}{where})", code="invalid_json") from None
    except RecursionError:  # "[" * 100000: arrays or objects nested past what the parser's recursion allows
        raise ApiError(400, "the request body is not valid JSON (nested too deeply)", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {json_type(body)}", code="invalid_json")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # an escaped lone surrogate ("\ud800") is not text: no tokenizer takes it
        raise ApiError(400, "the request body has a lone surrogate escape (like \\ud800): strings must be valid "
                            "Unicode text", code="invalid_json") from None
    except RecursionError:  # parsed just under the limit, but a few frames deeper here
        raise ApiError(400, "the request body is not valid JSON (nested too deeply)", code="invalid_json") from None
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_request(endpoint: str, body: dict, base: DecodeSettings, model_ids: tuple[str, ...]) -> CompletionRequest:
    """A request body (already a dict) checked against the endpoint's fields and d3's settings.

    `base` is the server's settings; `model_ids` the names the loaded model answers to (the first is its id)."""
    known = ENDPOINT_FIELDS[endpoint]
    for field, value in body.items():
        if field in UNSUPPORTED:
            if not any(is_neutral(value, neutral) for neutral in UNSUPPORTED[field]):
                raise ApiError(400, f"{field} is not supported by d3 serve: {UNSUPPORTED_REASONS[field]}",
                               param=field, code="unsupported_parameter")
        elif field not in known and field not in IGNORED:
            raise ApiError(400, f"unknown field {field!r}{did_you_mean(field, known)}", param=field,
                           code="unknown_parameter")
    check_model(body.get("model"), model_ids)
    stream = optional(body, "stream", bool, False)
    include_usage = stream_usage(body.get("stream_options"), stream)
    settings = request_settings(endpoint, body, base)
    d3_fields = tuple(field for field in D3_FIELDS if field in body)
    if endpoint == CHAT:
        return CompletionRequest(CHAT, settings, messages=chat_messages(body.get("messages")), stream=stream,
                                 include_usage=include_usage, d3_fields=d3_fields)
    return CompletionRequest(COMPLETION, settings, prompt=completion_prompt(body.get("prompt")), stream=stream,
                             include_usage=include_usage, d3_fields=d3_fields)


def optional(body: dict, field: str, kind: type, default):
    """body[field] when present and not null, checked to be of `kind` (bool is not an int here)."""
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad_field(field, f"{field} must be {json_type(kind())}, not {json_type(value)}", code="invalid_type")
    return value


def is_neutral(value, neutral) -> bool:
    """Whether an unsupported field's value asks for nothing (0 and 0.0 alike; false is not 0)."""
    if neutral is None or isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    if isinstance(neutral, int):
        return isinstance(value, (int, float)) and value == neutral
    return value == neutral


def check_model(model, model_ids: tuple[str, ...]) -> None:
    """`model` must name the served model; null or "" (for clients that must send something) mean "the one served"."""
    if model is None or model == "":
        return
    if not isinstance(model, str):
        raise bad_field("model", f"model must be a string, not {json_type(model)}", code="invalid_type")
    if model not in model_ids:
        raise ApiError(404, f"model {model!r} is not served here: this server serves {model_ids[0]!r} "
                            "(or leave model out)", param="model", code="model_not_found")


def stream_usage(options, stream: bool) -> bool:
    """stream_options.include_usage; stream_options only make sense with stream true."""
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_field("stream_options", f"stream_options must be an object, not {json_type(options)}",
                        code="invalid_type")
    if not stream:
        raise bad_field("stream_options", "stream_options is only allowed with stream: true")
    unknown = [key for key in options if key != "include_usage"]
    if unknown:
        raise bad_field("stream_options", f"stream_options has an unknown key {unknown[0]!r}")
    return bool(optional(options, "include_usage", bool, False))


def request_settings(endpoint: str, body: dict, base: DecodeSettings) -> DecodeSettings:
    """The server's settings with the request's length, sampling, stops and D3 fields applied."""
    options: dict[str, tuple[str, object]] = {}  # apply_options key -> (the request's field, value)
    length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(length_field) if endpoint == CHAT else body.get("max_tokens")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise bad_field(length_field, f"{length_field} must be an integer, not {json_type(max_tokens)}",
                            code="invalid_type")
        options["max_new_tokens"] = (length_field, max_tokens)
    for field, key in SAMPLING_FIELDS.items():
        if body.get(field) is not None:
            options[key] = (field, body[field])
    for field in D3_FIELDS:
        if field in body:
            options[field] = (field, body[field])
    stops = options.get("stop", (None, None))[1]
    if stops is not None:
        check_stops(stops)
    temperature = options.get("temperature", (None, base.sampling.temperature))[1]
    if temperature == 0 and not isinstance(temperature, bool):
        # OpenAI clients send top_p (and some top_k) along with temperature 0: greedy decoding ignores them.
        options.pop("top_p", None)
        options.pop("top_k", None)
        base = dataclasses.replace(base, sampling=dataclasses.replace(base.sampling, top_p=1.0, top_k=0))
    try:
        return apply_options(base, {key: value for key, (_, value) in options.items()})
    except UserError as error:
        for key, (field, value) in options.items():
            try:
                apply_options(base, {key: value})
            except UserError as alone:
                raise bad_field(field, plain_message(str(alone), key, field)) from None
        raise ApiError(400, str(error), code="invalid_value") from None


def plain_message(message: str, key: str, field: str) -> str:
    """apply_options' words with the request's field name: "key 'x' must be ..." -> "x must be ..."."""
    return message.replace(f"key {key!r}", field).replace(key.replace("_", "-"), field)


def check_stops(stops) -> None:
    values = [stops] if isinstance(stops, str) else stops
    if not isinstance(values, list) or not all(isinstance(stop, str) for stop in values):
        raise bad_field("stop", f"stop must be a string or a list of strings, not {json_type(stops)}",
                        code="invalid_type")
    if any(stop == "" for stop in values):
        raise bad_field("stop", "stop strings must not be empty")


def chat_messages(messages) -> tuple[dict, ...]:
    """The conversation as {"role", "content"} dicts with plain-text content, roles as chat templates know them."""
    if messages is None:
        raise bad_field("messages", "messages is required: a list of {role, content} objects", code="missing_required")
    if not isinstance(messages, list):
        raise bad_field("messages", f"messages must be a list, not {json_type(messages)}", code="invalid_type")
    if not messages:
        raise bad_field("messages", "messages must not be empty")
    checked = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            raise bad_field(where, f"{where} must be an object, not {json_type(message)}", code="invalid_type")
        role = message.get("role")
        if role == "tool" or message.get("tool_calls"):
            raise ApiError(400, f"{where}: tool messages and tool calls are not supported by d3 serve",
                           param=f"{where}.role", code="unsupported_parameter")
        if role not in CHAT_ROLES:
            raise bad_field(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, not "
                                             f"{json.dumps(role)}")
        checked.append({"role": CHAT_ROLES[role], "content": message_text(message.get("content"), where)})
    return tuple(checked)


def message_text(content, where: str) -> str:
    """A message's content as text: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for number, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_field(f"{where}.content[{number}]", f"{where}.content[{number}] must be a text part "
                                "{\"type\": \"text\", \"text\": ...}: d3 serve takes text only",
                                code="unsupported_parameter")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_field(f"{where}.content", f"{where}.content must be a string or a list of text parts, not "
                                        f"{json_type(content)}", code="invalid_type")


def completion_prompt(prompt) -> str:
    if prompt is None:
        raise bad_field("prompt", "prompt is required", code="missing_required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if isinstance(prompt, list) and all(isinstance(item, str) for item in prompt):
        raise bad_field("prompt", f"prompt has {len(prompt)} prompts: d3 serve takes one per request",
                        code="unsupported_parameter")
    if not isinstance(prompt, str):
        raise bad_field("prompt", f"prompt must be a string, not {json_type(prompt)}", code="invalid_type")
    return prompt


def schedule_error(error: UserError, request: CompletionRequest) -> ApiError:
    """A schedule that does not fit the model (min_layers above L, importance order without a profile) as a 400
    naming the field: the one D3 field the request set, else the one the message names."""
    message = str(error)
    named = [field for field in request.d3_fields if field in message or field.replace("_", "-") in message]
    candidates = named or (list(request.d3_fields) if len(request.d3_fields) == 1 else [])
    if candidates:
        return bad_field(candidates[0], plain_message(message, candidates[0], candidates[0]))
    return ApiError(400, f"the server's depth settings do not fit this request: {message}", code="invalid_value")
