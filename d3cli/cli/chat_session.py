"""What the user of `d3 chat` sees: the input loop (a prompt with history, or piped lines), slash commands, each
reply rendered live (or printed plainly, or as JSON lines), session totals. The conversation itself, its cache and its
decoding are core.conversation's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import typer

from d3cli.base.errors import UserError
from d3cli.base.paths import state_home
from d3cli.cli import render
from d3cli.core.decode import results
from d3cli.core.decode.schedule import parse_layer_count
from d3cli.core.session.saved_chat import read_saved_chat, write_saved_chat
from d3cli.core.text.prompts import decode_utf8

PROMPT = "you ❯ "


@dataclasses.dataclass
class ChatSession:
    """The conversation plus what the user sees: slash commands, rendering, session totals."""

    conversation: object  # core/session/conversation.Conversation, or server/client.RemoteConversation
    scripted: bool
    as_jsonl: bool = False
    records: list[dict] = dataclasses.field(default_factory=list)
    turn: int = 0

    # --- the loop ---------------------------------------------------------------------------------------------

    def run_interactive(self) -> None:
        history = ChatHistory()
        console = render.stdout_console()
        render.print_chat_banner(console, self.conversation.name, self.describe_settings())
        try:
            while True:
                try:
                    line = input(PROMPT)
                except EOFError:
                    console.print()
                    return
                except KeyboardInterrupt:
                    if history.line_buffer():
                        console.print()
                        continue
                    console.print()
                    return
                if not self.handle(line):
                    return
        finally:
            history.save()

    def run_scripted(self, stream: Iterable[bytes]) -> None:
        for number, raw in enumerate(stream, start=1):
            try:
                line = decode_utf8(raw, where=f"line {number}").rstrip("\r\n")
            except UserError as error:
                render.print_error(str(error))
                continue
            if line.strip() and not self.handle(line):
                return

    def handle(self, line: str) -> bool:
        """One input line: a slash command or a user turn. False when the chat should end."""
        if not line.strip():
            return True
        try:
            if line.startswith("/"):
                return self.command(line)
            self.reply(line)
        except UserError as error:
            render.print_error(str(error))
        return True

    # --- replies ----------------------------------------------------------------------------------------------

    def reply(self, text: str) -> None:
        from d3cli.core.decode.results import GenerationInterrupted

        conversation = self.conversation
        plan = conversation.plan(text)
        if plan.dropped_turns:
            self.info(f"dropped the {plan.dropped_turns} oldest message{'s' if plan.dropped_turns > 1 else ''} "
                      "to fit the model's context")
        interrupted = False
        try:
            if self.scripted:
                on_event = None if self.as_jsonl else write_text
                reply = conversation.reply(text, on_event=on_event, plan=plan)
            else:
                with render.ReplyView(render.stdout_console(), conversation.num_layers) as view:
                    reply = conversation.reply(text, on_event=view.add, plan=plan)
        except GenerationInterrupted as stopped:
            reply, interrupted = stopped.replies[0], True
        self.turn += 1
        record = {"turn": self.turn, **conversation.record(reply, plan)}
        self.records.append(record)
        if self.as_jsonl:
            render.write_json_line(record)
        elif self.scripted:
            render.write_stdout("" if reply.text.endswith("\n") else "\n")
        else:
            render.print_turn_summary(render.stdout_console(), record)
        if interrupted and self.scripted:
            raise typer.Exit(130)

    # --- slash commands ---------------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        name, _, argument = line[1:].partition(" ")
        argument = argument.strip()
        handler = COMMANDS.get(name.lower())
        if handler is None:
            from d3cli.core.session.settings import did_you_mean

            raise UserError(f"unknown command /{name}{did_you_mean(name, COMMANDS, '/')}; /help lists them")
        return handler.run(self, argument) is not False

    def info(self, message: str) -> None:
        if self.scripted:
            render.print_warning(message)
        else:
            render.print_info(render.stdout_console(), message)

    def describe_settings(self) -> str:
        decode_plan = self.conversation.decode_plan()
        if decode_plan is None:  # a served conversation: the server plans each reply
            return self.conversation.describe()
        schedule, calibration = decode_plan.schedule, decode_plan.calibration
        bridges = (f"calibration {calibration.label}, bridges {'on' if schedule.bridge_maps is not None else 'off'}"
                   if calibration is not None else "not calibrated (d3 calibrate)")
        if schedule.alpha == 1.0:  # nothing is skipped: the floor, ends and order do not matter
            return f"full depth, {schedule.num_layers} layers (α=1, {decode_plan.schedule_source}), {bridges}"
        return (f"α={schedule.alpha}, min-layers {schedule.min_layers} of {schedule.num_layers} "
                f"({decode_plan.schedule_source}), head {schedule.head}, tail {schedule.tail}, skip order "
                f"{schedule.skip_order}, {bridges}")

    def change_settings(self, **changes) -> None:
        updated = dataclasses.replace(self.conversation.settings, **changes)
        self.conversation.decode_plan(updated)  # validate against this model before accepting
        self.conversation.settings = updated
        self.info(f"now {self.describe_settings()}")

    def show_help(self, argument: str) -> None:
        lines = [f"/{name}{' ' + spec.argument if spec.argument else ''}: {spec.help}" for name, spec in
                 COMMANDS.items() if not spec.alias]
        self.info("\n".join(lines) if not self.scripted else "; ".join(lines))

    def reset(self, argument: str) -> None:
        self.conversation.reset()
        self.info("conversation cleared")

    def set_system(self, argument: str) -> None:
        self.conversation.set_system(argument or None)
        self.info(f"system message {'set' if argument else 'removed'}; it applies from the next reply")

    def set_alpha(self, argument: str) -> None:
        try:
            alpha = float(argument)
        except ValueError:
            raise UserError(f"/alpha needs a number in (0, 1], like /alpha 0.98, not {argument!r}") from None
        self.change_settings(alpha=alpha)

    def set_min_layers(self, argument: str) -> None:
        if not argument:
            raise UserError("/min-layers needs a count or a fraction of the layers, like /min-layers 24")
        self.change_settings(min_layers=parse_layer_count(argument, "min-layers"))

    def show_stats(self, argument: str) -> None:
        totals = results.session_totals(self.records, self.conversation.num_layers)
        if totals is None:
            self.info("no replies yet")
        elif self.scripted:
            render.print_warning(render.stats_text(totals))
        else:
            render.print_session_stats(render.stdout_console(), totals)

    def save(self, argument: str) -> None:
        if not argument:
            raise UserError("/save needs a file name, like /save chat.json")
        path = Path(argument).expanduser()
        write_saved_chat(path, self.conversation.name, self.conversation.system, self.conversation.settings,
                         self.conversation.messages)
        self.info(f"saved {len(self.conversation.messages)} messages to {path}")

    def load(self, argument: str) -> None:
        if not argument:
            raise UserError("/load needs a file name, like /load chat.json")
        path = Path(argument).expanduser()
        system, settings, messages, model = read_saved_chat(path, self.conversation.settings)
        self.conversation.decode_plan(settings)
        self.conversation.settings = settings
        self.conversation.set_system(system)
        self.conversation.messages = messages
        note = "" if model == self.conversation.name else f" (saved with {model})"
        self.info(f"loaded {len(messages)} messages from {path}{note}; now {self.describe_settings()}")

    def exit(self, argument: str) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class SlashCommand:
    run: Callable[[ChatSession, str], object]
    help: str
    argument: str = ""
    alias: bool = False


COMMANDS: dict[str, SlashCommand] = {
    "help": SlashCommand(ChatSession.show_help, "this list"),
    "reset": SlashCommand(ChatSession.reset, "forget the conversation (the system message stays)"),
    "system": SlashCommand(ChatSession.set_system, "set the system message (empty: remove it)", "TEXT"),
    "alpha": SlashCommand(ChatSession.set_alpha, "set the decay rate α in (0, 1]", "X"),
    "min-layers": SlashCommand(ChatSession.set_min_layers, "set the floor: a count or a fraction of L", "N"),
    "stats": SlashCommand(ChatSession.show_stats, "totals for this session"),
    "save": SlashCommand(ChatSession.save, "save the conversation and settings as JSON", "FILE"),
    "load": SlashCommand(ChatSession.load, "load a conversation saved with /save", "FILE"),
    "exit": SlashCommand(ChatSession.exit, "end the chat (also Ctrl-D)"),
    "quit": SlashCommand(ChatSession.exit, "end the chat", alias=True),
}


def write_text(event) -> None:
    if event.text:
        render.write_stdout(event.text)


class ChatHistory:
    """Arrow-key history for the chat prompt, kept in $XDG_STATE_HOME/d3/chat_history."""

    def __init__(self):
        try:
            import readline
        except ImportError:  # no readline on this platform: plain input
            self.readline = None
            return
        self.readline = readline
        self.path = state_home() / "chat_history"
        try:
            readline.read_history_file(self.path)
        except OSError:
            pass
        readline.set_history_length(1000)

    def line_buffer(self) -> str:
        return self.readline.get_line_buffer() if self.readline else ""

    def save(self) -> None:
        if self.readline is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.path)
        except OSError:
            pass

