"""The `d3` command: a Typer app whose subcommands live in `d3cli/commands/`, and the edge where errors become exits.

Exit codes: 0 done; 2 a user mistake (one line on stderr); 130 Ctrl-C; 141 stdout closed early (`| head`);
1 a bug (one line; the traceback with D3_DEBUG=1). No torch is imported here. Under `accelerate launch` only rank 0
prints a user mistake: every process makes the same checks (a data-parallel bench makes them fail together), so the
other processes exit 2 quietly.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Annotated, Optional

import typer

from d3cli import __version__
from d3cli.base.errors import OutputClosed, UserError
from d3cli.base.launch import secondary_process
from d3cli.cli.commands.bench import bench
from d3cli.cli.commands.calibrate import calibrate
from d3cli.cli.commands.chat import chat
from d3cli.cli.commands.config import ConfigState, config_app
from d3cli.cli.commands.generate import generate
from d3cli.cli.commands.profile_ppl import profile_ppl
from d3cli.cli.commands.serve import serve
from d3cli.cli.config import load_configuration, option_defaults, subcommands
from d3cli.cli.render import print_error, write_stdout

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

app = typer.Typer(
    name="d3",
    help="Faster generation for Hugging Face LLMs with Position-Aware Depth Decay Decoding (D3): "
    "later tokens run fewer layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(generate)
app.command()(chat)
app.command()(bench)
app.command("profile-ppl")(profile_ppl)
app.command()(calibrate)
app.command()(serve)
app.add_typer(config_app, name="config")


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command()
def completions(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the shell completion script for SHELL (the README says where to put it)."""
    from d3cli.cli.completions import script

    write_stdout(script(app, shell.value))




def show_version(value: bool) -> None:
    if value:
        typer.echo(f"d3 {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """d3: Position-Aware Depth Decay Decoding for any Hugging Face causal LM."""


def _quiet_broken_pipe() -> None:
    """stdout's reader is gone: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def configuration_state() -> ConfigState:
    """Settings from files and D3_* variables, or the reason they could not be read."""
    defaults = {name: option_defaults(callback) for name, callback in subcommands(app).items()}
    try:
        return ConfigState(load_configuration(app), None, defaults)
    except UserError as problem:
        return ConfigState(None, problem, defaults)


def _needs_no_config(arguments: list[str]) -> bool:
    """`d3 config ...` must work with a broken configuration file (it is how one finds the file), and so must
    `--help` and `--version` (they run nothing)."""
    return _command_word(arguments) == "config" or any(argument in ("--help", "-h", "--version")
                                                       for argument in arguments)


def _command_word(arguments: list[str]) -> str | None:
    """The subcommand named on the command line (its first word that is not an option), or None."""
    return next((argument for argument in arguments if not argument.startswith("-")), None)


def _is_usage_error(error: Exception) -> bool:
    """Click's usage errors (bad option, bad value), whether Typer uses click or its own vendored copy of it."""
    return any(cls.__name__ == "UsageError" for cls in type(error).__mro__) and hasattr(error, "format_message")


def _usage_error_line(error) -> str:
    context = getattr(error, "ctx", None)
    hint = f" (see `{context.command_path} --help`)" if context is not None else ""
    message = error.format_message().replace(": Value error, ", ": ")  # an Enum's ValueError, as click words it
    return f"{message}{hint}"


def run(args: list[str] | None = None) -> int:
    """Run the app; return the exit code instead of raising, with every failure turned into one line."""
    command = typer.main.get_command(app)
    arguments = sys.argv[1:] if args is None else list(args)
    try:
        state = configuration_state()
        if state.problem is not None and not _needs_no_config(arguments):
            raise state.problem
        default_map = state.configuration.default_map() if state.configuration else None
        result = command.main(args=arguments, prog_name="d3", standalone_mode=False, default_map=default_map,
                              obj=state)
        return result if isinstance(result, int) else 0
    except UserError as error:
        if not secondary_process():
            print_error(str(error))
        return EXIT_USER_ERROR
    except typer.Exit as done:
        return done.exit_code
    except (KeyboardInterrupt, typer.Abort):
        sys.stderr.write("\nd3: interrupted\n")
        return EXIT_INTERRUPTED
    except (OutputClosed, BrokenPipeError):
        _quiet_broken_pipe()
        return EXIT_BROKEN_PIPE
    except Exception as error:
        if _is_usage_error(error):
            if not secondary_process() and error.format_message():  # none: a bare `d3` showed the help instead
                print_error(_usage_error_line(error))
            return EXIT_USER_ERROR
        if os.environ.get("D3_DEBUG"):  # a bug: one line, unless the user asks for the traceback
            raise
        print_error(f"internal error: {type(error).__name__}: {error} (run with D3_DEBUG=1 for the traceback)")
        return 1


# Commands whose work is all written and flushed when run() returns: a process that imported torch leaves at once
# instead of tearing down its ~1,500 modules one by one (0.17-0.25 s of every call, which a shell loop pays each time).
QUICK_EXIT_COMMANDS = ("generate", "chat")


def main() -> None:
    code = run()
    if _command_word(sys.argv[1:]) in QUICK_EXIT_COMMANDS and "torch" in sys.modules:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):  # stdout's reader is gone: the interpreter's own exit handles it
            sys.exit(code)
        os._exit(code)
    sys.exit(code)
