"""The OpenAI API's responses as d3 serves them: a finished reply as one response object, a streamed one as chunks
and server-sent events, each with the `d3` object (layers per token, mean layers, the schedule). Pure: no torch, no
web framework. The requests are protocol.py's."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from d3cli.core.decode.results import Reply, reply_record
from d3cli.server.protocol import CHAT, COMPLETION, FINISH_REASONS, CompletionRequest


@dataclass(frozen=True)
class ResponseIdentity:
    """What every object of one response carries: its id, creation time and model name."""

    id: str
    created: int
    model: str
    weights: dict | None = None  # which weights ran (results.weights_fields), for the `d3` object

    @classmethod
    def new(cls, endpoint: str, model: str, weights: dict | None = None) -> ResponseIdentity:
        prefix = "chatcmpl" if endpoint == CHAT else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model, weights)

    def header(self, endpoint: str, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if endpoint == CHAT else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}


def finish_reason(reply: Reply) -> str:
    return FINISH_REASONS.get(reply.finish_reason, "stop")


def usage(prompt_tokens: int, reply: Reply, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: the prompt's tokens the prompt cache gave."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": reply.generated_tokens,
            "total_tokens": prompt_tokens + reply.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def d3_extension(reply: Reply, plan, prompt_tokens: int, identity: ResponseIdentity, batch_size: int = 1,
                 cached_tokens: int = 0) -> dict:
    """D3's numbers for one reply, in the extension object `d3`: every field of `d3 generate --json`'s record but
    the text and the model (the response has them), so that `d3 generate --server` prints what a local run prints;
    and `batch_size`: how many replies were decoded together with this one, itself included."""
    record = reply_record(reply, plan, identity.model, prompt_tokens, cached_tokens=cached_tokens)
    del record["model"], record["text"]
    return {**(identity.weights or {"weights": None}), **record, "batch_size": batch_size}


def token_extension(event) -> dict:
    """The `d3` object of one token's chunk: its id, the layers that ran for it and when it came."""
    return {"token_id": event.token_id, "layers": event.layers, "elapsed_s": round(event.elapsed_s, 4)}


def completion_response(endpoint: str, identity: ResponseIdentity, reply: Reply, plan,
                        prompt_tokens: int, batch_size: int = 1, cached_tokens: int = 0) -> dict:
    """The whole (non-streamed) response object of a finished reply."""
    if endpoint == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.text, "refusal": None},
                  "logprobs": None, "finish_reason": finish_reason(reply)}
    else:
        choice = {"index": 0, "text": reply.text, "logprobs": None, "finish_reason": finish_reason(reply)}
    return {**identity.header(endpoint), "choices": [choice], "usage": usage(prompt_tokens, reply, cached_tokens),
            "d3": d3_extension(reply, plan, prompt_tokens, identity, batch_size, cached_tokens)}


class ChunkStream:
    """The chunks of one streamed reply: one per token as its events come, then the finish chunk, then (when asked)
    the usage chunk with empty choices; D3's numbers ride on the last of them."""

    def __init__(self, request: CompletionRequest, identity: ResponseIdentity, plan, prompt_tokens: int):
        self.request = request
        self.identity = identity
        self.plan = plan
        self.prompt_tokens = prompt_tokens
        self.reply = Reply()

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {**self.identity.header(self.request.endpoint, chunk=True), "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.request.endpoint == COMPLETION:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {} if text is None else {"content": text}
        if role:
            delta = {"role": "assistant", **delta}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def token(self, event) -> list[dict]:
        """The chunk of one token: its text (the first also carries the role) and its `d3` object. The token that ends
        the reply (EOS, or the end of a stop string) has a chunk only when it adds text (the last chunk's `d3`
        record still counts it)."""
        first = not self.reply.token_ids
        self.reply.add(event)
        if event.finish_reason is not None and not event.text and not first:
            return []
        return [{**self._chunk([self._choice(event.text, None, role=first)]), "d3": token_extension(event)}]

    def finish(self, batch_size: int = 1, cached_tokens: int = 0) -> list[dict]:
        """The finish chunk and, when asked, the usage chunk; the last carries `d3`."""
        chunks = [self._chunk([self._choice(None, finish_reason(self.reply))])]
        if self.request.include_usage:
            chunks.append({**self._chunk([]), "usage": usage(self.prompt_tokens, self.reply, cached_tokens)})
        chunks[-1]["d3"] = d3_extension(self.reply, self.plan, self.prompt_tokens, self.identity, batch_size,
                                        cached_tokens)
        return chunks


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")


def models_response(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "d3"}]}
