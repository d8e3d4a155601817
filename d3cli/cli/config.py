"""Settings from files and the environment, merged under the command line. No torch here.

Precedence, highest first: command line > environment (`D3_<KEY>`, or `D3_<COMMAND>_<KEY>` for one subcommand) >
project file (`d3.toml`, over `[tool.d3]` in `pyproject.toml`, in the working directory) > user file
(`$XDG_CONFIG_HOME/d3/config.toml`, default `~/.config/d3/config.toml`) > built-in defaults.

A file holds shared keys at its top level and per-subcommand tables (`[generate]`, `[chat]`, ...) over them. The keys
are the subcommands' long option names with `_` for `-` (`min_layers`, `max_new_tokens`). The valid keys and their
types come from the Typer app itself, so a new option is configurable the day it exists.
"""

from __future__ import annotations

import enum
import inspect
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from d3cli.base.errors import UserError, check_at_least
from d3cli.core.decode.schedule import parse_layer_count
from d3cli.core.session.settings import VALUE_CHECKS as SETTINGS_CHECKS
from d3cli.core.session.settings import did_you_mean, json_type

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ENV_PREFIX = "D3_"
RESERVED_ENV = {"D3_CACHE_DIR", "D3_DATA_DIR", "D3_DEBUG", "D3_KERNELS", "D3_KERNELS_MARCH"}  # d3's own paths and
# switches, not option values
LAYER_COUNT_KEYS = {"min_layers", "head", "tail"}
NOT_CONFIGURABLE = {"help", "version"}


# Each key's range is checked by the settings' own function (one place, one message); batch sizes by the bound
# the commands check.
VALUE_CHECKS = {**SETTINGS_CHECKS, "batch_size": lambda value: check_at_least("batch-size", value, 1)}


@dataclass(frozen=True)
class OptionSpec:
    """What a configurable option accepts, read off the click parameter Typer built for it."""

    key: str  # the config key: long option name, '-' -> '_'
    param_name: str  # the click parameter name (default_map key)
    kind: str  # "text", "integer", "float", "boolean", "choice"
    choices: tuple[str, ...] = ()
    multiple: bool = False

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.key in LAYER_COUNT_KEYS:
            return "a layer count or a fraction of the layers"
        names = {"text": "a string", "integer": "an integer", "float": "a number", "boolean": "true or false"}
        return "a list of strings" if self.multiple else names.get(self.kind, self.kind)


def _long_name(parameter_name: str, option_info) -> str:
    """The option's long name: declared in typer.Option(...), or derived from the parameter as Typer does."""
    declared = [getattr(option_info, "default", None), *(getattr(option_info, "param_decls", None) or ())]
    for name in declared:
        if isinstance(name, str) and name.startswith("--"):
            return name.split("/")[0]
    return "--" + parameter_name.replace("_", "-")


def option_specs(callback) -> dict[str, OptionSpec]:
    """Configurable options of one subcommand, by config key, read off its function's annotations."""
    specs = {}
    for name, hint in typing.get_type_hints(callback, include_extras=True).items():
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        annotation, *metadata = typing.get_args(hint)
        option_info = next((item for item in metadata if type(item).__name__ == "OptionInfo"), None)
        if option_info is None or name in NOT_CONFIGURABLE:
            continue
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(inner) == 1:
            annotation = inner[0]  # Optional[X] -> X
        multiple = typing.get_origin(annotation) is list
        if multiple:
            annotation = typing.get_args(annotation)[0]
        choices: tuple[str, ...] = ()
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            kind, choices = "choice", tuple(str(member.value) for member in annotation)
        else:
            kind = {int: "integer", float: "float", bool: "boolean"}.get(annotation, "text")
        key = _long_name(name, option_info)[2:].replace("-", "_")
        specs[key] = OptionSpec(key, name, kind, choices, multiple)
    return specs


def option_defaults(callback) -> dict[str, object]:
    """Built-in defaults of a subcommand's configurable options, by config key."""
    parameters = inspect.signature(callback).parameters
    defaults = {}
    for key, spec in option_specs(callback).items():
        default = parameters[spec.param_name].default
        defaults[key] = getattr(default, "value", default)
    return defaults


def subcommands(app) -> dict[str, object]:
    """The app's subcommands that take options from configuration: name -> function."""
    commands = {}
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        if option_specs(info.callback):
            commands[name] = info.callback
    return commands


def check_value(spec: OptionSpec, value: object) -> object:
    """The value if it fits the option, else a UserError message (without the file name)."""
    if spec.multiple:
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
            raise UserError(f"must be {spec.describe()}, not {json_type(value)}")
        return values
    if spec.key == "alpha" and spec.kind == "text":  # bench's comma-separated list of decay rates
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"must be a number or numbers separated by commas, not {json_type(value)}")
        from d3cli.cli.options import parse_alphas

        parse_alphas(str(value))  # the command line's own parsing and range check
        return str(value)
    if spec.key in LAYER_COUNT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"must be {spec.describe()}, not {json_type(value)}")
        parse_layer_count(value, spec.key)  # the schedule's own parsing and range check
        return str(value)
    expected = {"text": (str,), "integer": (int,), "float": (int, float), "boolean": (bool,), "choice": (str,)}
    if isinstance(value, bool) != (spec.kind == "boolean") or not isinstance(value, expected[spec.kind]):
        raise UserError(f"must be {spec.describe()}, not {json_type(value)}")
    if spec.kind == "choice" and value not in spec.choices:
        raise UserError(f"must be {spec.describe()}, not {value!r}{did_you_mean(str(value), spec.choices)}")
    VALUE_CHECKS.get(spec.key, lambda _: None)(value)
    return value


def parse_env_value(spec: OptionSpec, text: str) -> object:
    """An environment variable's text as the option's type."""
    if spec.multiple or spec.kind in ("text", "choice") or spec.key in LAYER_COUNT_KEYS:
        return [text] if spec.multiple else text
    if spec.kind == "boolean":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise UserError("must be true or false (1/0, yes/no, on/off)")
    try:
        return int(text) if spec.kind == "integer" else float(text)
    except ValueError:
        raise UserError(f"must be {spec.describe()}, not {text!r}") from None


@dataclass
class Setting:
    value: object
    source: str  # where it came from, for `d3 config show`


@dataclass
class Configuration:
    """Every subcommand's settings from files and environment, with where each came from."""

    files: list[tuple[Path, bool]] = field(default_factory=list)  # (path, exists), lowest precedence first
    by_command: dict[str, dict[str, Setting]] = field(default_factory=dict)
    specs: dict[str, dict[str, OptionSpec]] = field(default_factory=dict)

    def default_map(self) -> dict[str, dict[str, object]]:
        """Click's default_map: for each subcommand, its option values from files and environment."""
        return {
            command: {self.specs[command][key].param_name: setting.value for key, setting in settings.items()}
            for command, settings in self.by_command.items()
        }


def user_config_path() -> Path:
    from d3cli.base.paths import config_home

    return config_home() / "config.toml"


def config_files(cwd: Path | None = None) -> list[tuple[Path, str]]:
    """The files d3 reads, lowest precedence first, with the label each has in `config show`."""
    cwd = cwd or Path.cwd()
    return [
        (user_config_path(), "user file"),
        (cwd / "pyproject.toml", "project file"),
        (cwd / "d3.toml", "project file"),
    ]


TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
END_OF_DOCUMENT = "(at end of document)"


def read_toml(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
        return tomllib.loads(text)
    except UnicodeDecodeError as error:
        raise UserError(f"{path}:1:1: not UTF-8 text (byte {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        line, column = getattr(error, "lineno", None), getattr(error, "colno", None)
        if match := TOML_POSITION.search(message):
            line, column = line or int(match.group(1)), column or int(match.group(2))
            message = message[: match.start()]
        elif message.endswith(END_OF_DOCUMENT):
            lines = text.split("\n")
            line, column = len(lines), len(lines[-1]) + 1
            message = message[: -len(END_OF_DOCUMENT)].rstrip() + " (at the end of the file)"
        raise UserError(f"{path}:{line or 1}:{column or 1}: {message}") from None


def load_configuration(app, cwd: Path | None = None, environ: dict[str, str] | None = None) -> Configuration:
    """Read and validate every configuration file and D3_* variable against the app's subcommands."""
    environ = os.environ if environ is None else environ
    specs = {name: option_specs(callback) for name, callback in subcommands(app).items()}
    shared_keys: dict[str, OptionSpec] = {}
    for command_specs in specs.values():
        for key, spec in command_specs.items():
            shared_keys.setdefault(key, spec)
    configuration = Configuration(specs=specs, by_command={name: {} for name in specs})

    for path, label in config_files(cwd):
        exists = path.is_file()
        configuration.files.append((path, exists))
        if not exists:
            continue
        table = read_toml(path)
        where = str(path)
        if path.name == "pyproject.toml":
            table = table.get("tool", {}).get("d3")
            if table is None:
                continue
            where = f"{path} [tool.d3]"
            if not isinstance(table, dict):
                raise UserError(f"{path}: [tool.d3] must be a table")
        apply_table(configuration, table, shared_keys, path, f"{label} {where}")

    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable in RESERVED_ENV:
            continue
        name = variable[len(ENV_PREFIX):].lower()
        for command, command_specs in specs.items():
            prefix = command.replace("-", "_") + "_"
            key, specific = (name[len(prefix):], True) if name.startswith(prefix) else (name, False)
            spec = command_specs.get(key)
            if spec is None:
                continue
            current = configuration.by_command[command].get(key)
            if not specific and current is not None and current.source.startswith("environment"):
                continue  # D3_<COMMAND>_<KEY> wins over D3_<KEY>
            try:
                value = check_value(spec, parse_env_value(spec, text))
            except UserError as error:
                raise UserError(f"environment variable {variable}: {error}") from None
            configuration.by_command[command][key] = Setting(value, f"environment {variable}")
    return configuration


def apply_table(configuration: Configuration, table: dict, shared_keys: dict[str, OptionSpec], path: Path,
                source: str) -> None:
    """Shared top-level keys first, then each subcommand's table over them."""
    commands = configuration.specs
    for key, value in table.items():
        if isinstance(value, dict):  # a table: a subcommand's settings (`chat = true` is the --chat option)
            if key not in commands:
                raise UserError(f"{path}: unknown table [{key}]{did_you_mean(key, commands)} "
                                f"(tables: {', '.join(commands)})")
            continue
        if key not in shared_keys:
            raise UserError(f"{path}: unknown key {key!r}{did_you_mean(key, shared_keys)}")
        for command, command_specs in commands.items():
            if key in command_specs:  # each subcommand checks it by its own option's type
                try:
                    checked = check_value(command_specs[key], value)
                except UserError as error:
                    raise UserError(f"{path}: key {key!r} {error}") from None
                configuration.by_command[command][key] = Setting(checked, source)
    for command, command_specs in commands.items():
        section = table.get(command)
        if not isinstance(section, dict):
            continue
        for key, value in section.items():
            spec = command_specs.get(key)
            if spec is None:
                raise UserError(f"{path}: unknown key {key!r} in [{command}]{did_you_mean(key, command_specs)}")
            try:
                checked = check_value(spec, value)
            except UserError as error:
                raise UserError(f"{path}: key {key!r} in [{command}] {error}") from None
            configuration.by_command[command][key] = Setting(checked, f"{source} [{command}]")
