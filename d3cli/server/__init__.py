"""`d3 serve`: an OpenAI-compatible HTTP server on the one loader and engine.

    protocol.py   request bodies -> a checked `CompletionRequest`; replies -> OpenAI response objects and stream
                  chunks; OpenAI-style error objects. Pure: no torch, no web framework.
    worker.py     the one thread that owns the model: a bounded queue of jobs, each decoded by `engine.stream_decode`,
                  its events handed to the asyncio loop; a cancelled job's stream is closed at the next token.
    app.py        the ASGI routes (Starlette), body limits, API key, disconnect watching, the request log.

This layer may import d3cli.core; nothing in core or evaluation imports it, and it imports nothing of d3cli.cli.
"""
