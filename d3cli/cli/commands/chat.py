"""`d3 chat`: a multi-turn conversation decoded with D3.

On a terminal: a prompt with history (readline), each reply live with a layer bar per token and a one-line summary,
slash commands. With stdin not a terminal (or --jsonl): each input line is a user turn and each reply is printed as
plain text, or as one JSON object a line. The session (loop, slash commands, rendering) is cli/chat_session.py's.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from d3cli.cli import render
from d3cli.cli.chat_session import ChatSession
from d3cli.cli.options import (
    OUTPUT_PANEL,
    DepthArgs,
    ModelArgs,
    SamplingArgs,
    ServerOption,
    SystemOption,
    uses_option_groups,
)
from d3cli.core.session.settings import DecodeSettings


@uses_option_groups
def chat(
    model: ModelArgs = ModelArgs(),
    depth: DepthArgs = DepthArgs(),
    sampling: SamplingArgs = SamplingArgs(),
    system: SystemOption = None,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="Scripted chat: one JSON object per reply (keys of generate --json "
                           "plus turn).", rich_help_panel=OUTPUT_PANEL),
    ] = False,
    server: ServerOption = None,
) -> None:
    """Chat with a model, every reply decoded with D3 (the depth schedule restarts for each reply).

    Type /help in the chat for its commands. Piped, each input line is one user turn.
    """
    settings = DecodeSettings.from_options(**depth.values(), **sampling.values(), chat=True)
    if server:
        conversation = served_conversation(server, model, settings, system)
    else:
        from d3cli.core.session.conversation import Conversation
        from d3cli.core.session.front_door import open_model

        with render.LoadingBar(model.options().model or "the embedded model") as bar:
            loaded = open_model(model.options(lean=True), settings, progress=bar.progress).loaded
        conversation = Conversation(loaded, settings, system=system)
        conversation.decode_plan()  # the depth options fit this model
    scripted = jsonl or not sys.stdin.isatty()
    session = ChatSession(conversation, scripted=scripted, as_jsonl=jsonl)
    if scripted:
        session.run_scripted(sys.stdin.buffer)
    else:
        session.run_interactive()


def served_conversation(url: str, model: ModelArgs, settings: DecodeSettings, system: str | None):
    """--server: the conversation kept here, each reply made by a running `d3 serve` of the same model."""
    from d3cli.server.client import RemoteConversation, RemoteModel

    return RemoteConversation(RemoteModel.connect(url, model.served_model()), settings, system=system)
