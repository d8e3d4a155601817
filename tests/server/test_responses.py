"""server/responses.py: whole replies as OpenAI response objects and streamed ones as chunks, each checked against
the `openai` package's own models, with the `d3` object; server-sent event framing."""

from __future__ import annotations

import json

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from d3cli.core.decode.engine import TokenEvent
from d3cli.core.session.plan import plan_of
from d3cli.core.session.settings import DecodeSettings
from d3cli.server import protocol, responses
from d3cli.server.protocol import CHAT, COMPLETION
from d3cli.server.responses import ChunkStream, ResponseIdentity
from server.test_protocol import chat

MODEL = "tiny"
BASE = DecodeSettings()
HELLO = [{"role": "user", "content": "Hello"}]


def events(texts, finish_reason="eos"):
    """Token events as the engine makes them: the last one ends the reply."""
    return [TokenEvent(row=0, index=index, token_id=100 + index, text=text, layers=8 - min(index, 2),
                       elapsed_s=0.01 * (index + 1), finish_reason=finish_reason if index == len(texts) - 1 else None)
            for index, text in enumerate(texts)]


def decode_plan():
    return plan_of(DecodeSettings(alpha=0.9, min_layers=6, head=1, tail=1), 8)


def test_a_whole_chat_response_is_an_openai_chat_completion():
    from d3cli.core.decode.results import Reply

    reply = Reply()
    for event in events(["Hi", " there", ""]):
        reply.add(event)
    identity = ResponseIdentity.new(CHAT, MODEL)
    body = responses.completion_response(CHAT, identity, reply, decode_plan(), prompt_tokens=9)
    parsed = ChatCompletion.model_validate(json.loads(json.dumps(body)))
    assert parsed.id.startswith("chatcmpl-") and parsed.object == "chat.completion" and parsed.model == MODEL
    assert parsed.choices[0].message.content == "Hi there" and parsed.choices[0].finish_reason == "stop"
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (9, 3, 12)
    assert body["d3"]["layers_per_token"] == [8, 7, 6] and body["d3"]["mean_layers"] == 7.0
    assert body["d3"]["layer_ratio"] == 0.875 and body["d3"]["estimated_speedup"] == round(8 / 7, 4)
    assert body["d3"]["token_ids"] == [100, 101, 102] and body["d3"]["num_layers"] == 8
    assert parsed.usage.prompt_tokens_details.cached_tokens == 0 and body["d3"]["cached_prompt_tokens"] == 0
    cached = responses.completion_response(CHAT, identity, reply, decode_plan(), prompt_tokens=9, cached_tokens=7)
    assert ChatCompletion.model_validate(cached).usage.prompt_tokens_details.cached_tokens == 7
    assert cached["d3"]["cached_prompt_tokens"] == 7


def test_a_whole_completion_response_is_an_openai_completion():
    from d3cli.core.decode.results import Reply

    reply = Reply()
    for event in events(["a", "b"], finish_reason="length"):
        reply.add(event)
    body = responses.completion_response(COMPLETION, ResponseIdentity.new(COMPLETION, MODEL), reply, decode_plan(), 4)
    parsed = Completion.model_validate(body)
    assert parsed.object == "text_completion" and parsed.id.startswith("cmpl-")
    assert parsed.choices[0].text == "ab" and parsed.choices[0].finish_reason == "length"


def stream_chunks(endpoint, include_usage, texts, finish_reason="eos"):
    request = chat(stream=True, stream_options={"include_usage": include_usage}) if endpoint == CHAT else \
        protocol.parse_request(COMPLETION, {"prompt": "x", "stream": True,
                                            "stream_options": {"include_usage": include_usage}}, BASE, (MODEL,))
    stream = ChunkStream(request, ResponseIdentity.new(endpoint, MODEL), decode_plan(), prompt_tokens=5)
    chunks = [chunk for event in events(texts, finish_reason) for chunk in stream.token(event)]
    return chunks + stream.finish()


def test_chat_chunks_one_per_token_then_finish_then_usage_with_d3_on_the_last():
    chunks = stream_chunks(CHAT, True, ["Hi", " there", ""])
    parsed = [ChatCompletionChunk.model_validate(chunk) for chunk in chunks]
    assert len(parsed) == 4  # two tokens with text; the EOS token adds none; finish; usage
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].choices[0].delta.content == "Hi"
    assert parsed[1].choices[0].delta.role is None and parsed[1].choices[0].delta.content == " there"
    assert parsed[2].choices[0].finish_reason == "stop" and parsed[2].choices[0].delta.content is None
    assert parsed[3].choices == [] and parsed[3].usage.completion_tokens == 3 and parsed[3].usage.prompt_tokens == 5
    assert all(chunk["usage"] is None for chunk in chunks[:3])
    assert [chunk["d3"] for chunk in chunks[:2]] == [{"token_id": 100, "layers": 8, "elapsed_s": 0.01},
                                                     {"token_id": 101, "layers": 7, "elapsed_s": 0.02}]
    assert "d3" not in chunks[2]  # the finish chunk: the EOS token is counted in the record that follows
    record = chunks[3]["d3"]
    assert record["layers_per_token"] == [8, 7, 6] and record["token_ids"] == [100, 101, 102]
    assert (record["prompt_tokens"], record["generated_tokens"], record["finish_reason"]) == (5, 3, "eos")
    assert {"alpha", "min_layers", "schedule_source", "calibration", "time_to_first_token_s",
            "decode_tokens_per_s"} <= set(record) and "text" not in record
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_without_usage_the_finish_chunk_is_last_and_carries_d3():
    chunks = stream_chunks(CHAT, False, ["Hi", "!"], finish_reason="length")
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, "length"]
    assert "usage" not in chunks[0] and "d3" in chunks[-1]


def test_a_first_token_without_text_still_opens_the_stream_with_the_role():
    chunks = stream_chunks(CHAT, False, [""], finish_reason="eos")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"


def test_completion_chunks_are_text_completions():
    chunks = stream_chunks(COMPLETION, True, ["a", "b", ""])
    assert [chunk["choices"][0]["text"] for chunk in chunks[:2]] == ["a", "b"]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks[:2]] == [None, None]  # as OpenAI streams them
    finish, usage = Completion.model_validate(chunks[2]), Completion.model_validate(chunks[3])
    assert finish.object == "text_completion" and finish.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage.total_tokens == 8


def test_sse_framing():
    assert responses.sse({"a": 1}) == b'data: {"a": 1}\n\n'
    assert responses.DONE == b"data: [DONE]\n\n"
