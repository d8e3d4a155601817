"""`d3 serve`: an OpenAI-compatible HTTP server (d3cli/server/). This module parses, checks, starts and renders.

Needs the optional extra `d3cli[serve]` (Starlette and uvicorn); without it, one line saying what to install.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

from d3cli.base.errors import UserError, check_at_least
from d3cli.cli import render
from d3cli.cli.options import DepthArgs, ModelArgs, SamplingArgs, batch_size_option, option, uses_option_groups
from d3cli.core.session.settings import DecodeSettings

SERVER_PANEL = "Server"
SERVE_PACKAGES = ("starlette", "uvicorn")


class LogFormat(str, Enum):
    rich = "rich"
    json = "json"


BatchSizeOption = batch_size_option("Decode up to this many waiting greedy requests with the same settings as "
                                    "one batch: more tokens/s under load, but a batched reply may differ from the "
                                    "same request decoded alone.", SERVER_PANEL)
HostOption = option(str, "Address to listen on. The default answers this machine only; 0.0.0.0 opens the server to "
                         "the network.", SERVER_PANEL)
PortOption = option(int, "Port to listen on (0: any free port, shown at start).", SERVER_PANEL)
ApiKeyOption = option(Optional[str], "Answer /v1/ requests only with 'Authorization: Bearer KEY' (also D3_API_KEY).",
                                     SERVER_PANEL, show_default=False)
QueueSizeOption = option(int, "Requests that may wait while one decodes; more get 503.", SERVER_PANEL)
PromptCacheOption = option(bool, "Keep the last reply's KV cache: a request that starts with the same tokens (the "
                                 "system prompt, few-shot examples, earlier turns) prefills only the rest. The "
                                 "same tokens on d3's kernels; --no-prompt-cache: every prompt prefilled whole.",
                           SERVER_PANEL)
LogFormatOption = option(LogFormat, "One line per request on stderr: rich for people, json for machines.", SERVER_PANEL)


@uses_option_groups
def serve(
    model: ModelArgs = ModelArgs(),
    depth: DepthArgs = DepthArgs(),
    sampling: SamplingArgs = SamplingArgs(),
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    api_key: ApiKeyOption = None,
    queue_size: QueueSizeOption = 16,
    batch_size: BatchSizeOption = 1,
    prompt_cache: PromptCacheOption = True,
    log_format: LogFormatOption = LogFormat.rich,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, every reply decoded with D3.

    POST /v1/chat/completions, POST /v1/completions (streamed or not), GET /v1/models, GET /health.
    The depth and sampling options are every request's defaults; a request's body may set its own alpha, min_layers, ...
    Ctrl-C stops the server.
    """
    settings = DecodeSettings.from_options(**depth.values(), **sampling.values())
    if isinstance(port, bool) or not 0 <= port <= 65535:
        raise UserError(f"--port must lie in 0..65535, not {port}")
    check_at_least("--queue-size", queue_size, 1)
    check_at_least("--batch-size", batch_size, 1)
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key must not be empty")
    check_serve_extra()

    from d3cli.server.app import bind
    from d3cli.server.app import serve as run_server
    from d3cli.server.state import ServeConfig

    sock = bind(host, port)
    config = ServeConfig(model.options(lean=True), settings, api_key=api_key, queue_size=queue_size,
                         max_batch=batch_size, prompt_cache=prompt_cache)
    run_server(config, sock, render.server_log(getattr(log_format, "value", log_format)))


def check_serve_extra() -> None:
    """Starlette and uvicorn are the optional extra `serve`: say how to install them when they are missing."""
    import importlib

    missing = []
    for package in SERVE_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise UserError(f"d3 serve needs {' and '.join(missing)}: pip install 'd3cli[serve]'")
