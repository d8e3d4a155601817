"""`d3 serve`: an OpenAI-compatible HTTP server on the one loader and engine.

    protocol.py   request bodies -> a checked `CompletionRequest`; OpenAI-style error objects. Pure: no torch, no
                  web framework.
    responses.py  replies -> OpenAI response objects and stream chunks with the `d3` object. Pure too.
    worker.py     the one thread that owns the model: a bounded queue of jobs, each decoded by `engine.stream_decode`,
                  its events handed to the asyncio loop; a cancelled job's stream is closed at the next token.
    state.py      the session (opened through the front door, in the background), the worker, each request's token
                  ids and plan.
    routes.py     the routes (Starlette): body limits, a request -> a Job -> JSON or server-sent events,
                  disconnect watching.
    app.py        the gate (API key, the request log), the socket, uvicorn, Ctrl-C.
    client.py     the other side: `d3 generate/chat --server` send their prompts to a running server (standard
                  library only) and get back the events and the record a local run makes.

This layer may import d3cli.core; nothing in core or evaluation imports it, and it imports nothing of d3cli.cli.
"""
