"""`d3 config show` and `d3 config path`: where d3's settings come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from d3cli.base.errors import UserError
from d3cli.cli import render
from d3cli.cli.config import Configuration
from d3cli.core.session.plan import SCHEDULE_KEYS  # unset: the model's calibration (or the default) decides


@dataclass
class ConfigState:
    """Handed to the config commands by the CLI: the loaded configuration, or why it could not load."""

    configuration: Configuration | None
    problem: UserError | None
    defaults: dict[str, dict[str, object]]  # subcommand -> config key -> built-in default


config_app = typer.Typer(help="Show d3's settings and the files they come from.", no_args_is_help=True)


def _state(ctx: typer.Context) -> ConfigState:
    state = ctx.find_root().obj
    if state.problem is not None:
        raise state.problem
    return state


SECRET_KEYS = {"api_key"}  # settings whose value `config show` must not print (d3 serve's key)


CALIBRATED_DEFAULT = "default: the model's calibrated schedule"


@config_app.command("show")
def show(
    ctx: typer.Context,
    command: Annotated[
        Optional[str], typer.Argument(help="Only this subcommand's settings (generate, chat, ...).",
                                      show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the settings as JSON.")] = False,
) -> None:
    """Print every setting's effective value and where it came from (file, environment or default)."""
    state = _state(ctx)
    configuration = state.configuration
    commands = list(configuration.specs)
    if command is not None and command not in commands:
        raise UserError(f"unknown subcommand {command!r} (choose from: {', '.join(commands)})")
    rows = {}
    for name in [command] if command else commands:
        rows[name] = {}
        for key in configuration.specs[name]:
            setting = configuration.by_command[name].get(key)
            if setting is not None:
                value = "(set, not shown)" if key in SECRET_KEYS and setting.value else setting.value
                rows[name][key] = {"value": value, "source": setting.source}
            else:
                value = state.defaults[name].get(key)
                source = CALIBRATED_DEFAULT if key in SCHEDULE_KEYS and value is None else "default"
                rows[name][key] = {"value": value, "source": source}
    if as_json:
        render.write_json_line(rows)
    else:
        render.print_settings(render.stdout_console(), rows)


@config_app.command("path")
def path(ctx: typer.Context) -> None:
    """List the configuration files d3 reads, lowest precedence first, and whether each exists."""
    from d3cli.cli.config import config_files

    for file, label in config_files():
        status = "found" if file.is_file() else "not found"
        render.write_stdout(f"{file}\t{label}\t{status}\n")
    state = ctx.find_root().obj
    if state is not None and state.problem is not None:
        raise state.problem
