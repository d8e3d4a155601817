"""Static shell completion scripts (bash, zsh, fish) generated from the Typer app: subcommands, options, choices.

Static scripts answer a TAB at once, with no Python start-up. `d3 completions SHELL` prints one; the copies in
`completions/` are its output, and a test fails when they fall behind the app.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from dataclasses import dataclass, field

from rich.markup import render as render_markup

PATH_OPTIONS = {"model", "calibration", "profile"}  # options whose value is a file or folder
HELP_NAMES = ("--help", "-h")


@dataclass(frozen=True)
class OptionCompletion:
    names: tuple[str, ...]  # "--model", "-m"
    help: str
    takes_value: bool
    choices: tuple[str, ...] = ()
    is_path: bool = False
    repeatable: bool = False


@dataclass
class CommandCompletion:
    name: str
    help: str
    options: list[OptionCompletion] = field(default_factory=list)
    subcommands: list[CommandCompletion] = field(default_factory=list)
    argument_choices: tuple[str, ...] = ()


def _first_line(text: str | None) -> str:
    """The first line of a help text as the terminal shows it (Rich markup such as an escaped `\\[plot]` undone)."""
    return (render_markup(inspect.cleandoc(text)).plain.splitlines() or [""])[0] if text else ""


def _strip_optional(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return annotation


def _choices(annotation) -> tuple[str, ...]:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(str(member.value) for member in annotation)
    return ()


def command_completion(name: str, callback, help_text: str | None, argument_choices=()) -> CommandCompletion:
    """Options and argument choices of one command, read off its function's annotations as Typer reads them."""
    command = CommandCompletion(name, _first_line(help_text or callback.__doc__), argument_choices=argument_choices)
    for parameter, hint in typing.get_type_hints(callback, include_extras=True).items():
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        annotation, *metadata = typing.get_args(hint)
        info = next((item for item in metadata if type(item).__name__ in ("OptionInfo", "ArgumentInfo")), None)
        annotation = _strip_optional(annotation)
        if info is None:
            continue
        if type(info).__name__ == "ArgumentInfo":
            command.argument_choices = command.argument_choices or _choices(annotation)
            continue
        declared = [item for item in (info.default, *(info.param_decls or ())) if isinstance(item, str)
                    and item.startswith("-")]
        declared = declared or ["--" + parameter.replace("_", "-")]
        names: list[str] = []
        for declaration in declared:
            names.extend(declaration.split("/"))
        repeatable = typing.get_origin(annotation) is list
        takes_value = annotation is not bool
        command.options.append(OptionCompletion(
            tuple(names), _first_line(info.help), takes_value, _choices(annotation),
            is_path=parameter in PATH_OPTIONS, repeatable=repeatable,
        ))
    command.options.append(OptionCompletion(HELP_NAMES, "Show this message and exit.", False))
    return command


def app_completion(app) -> CommandCompletion:
    """The whole command tree of the Typer app."""
    from d3cli.cli.config import subcommands

    configurable = tuple(subcommands(app))
    root = command_completion("d3", app.registered_callback.callback, app.info.help)
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        root.subcommands.append(command_completion(name, info.callback, info.help))
    for group in app.registered_groups:
        sub_app = group.typer_instance
        node = CommandCompletion(group.name, _first_line(sub_app.info.help))
        node.options.append(OptionCompletion(HELP_NAMES, "Show this message and exit.", False))
        for info in sub_app.registered_commands:
            name = info.name or info.callback.__name__.replace("_", "-")
            # `d3 config show COMMAND` takes a subcommand's name
            choices = configurable if (group.name, name) == ("config", "show") else ()
            node.subcommands.append(command_completion(name, info.callback, info.help, choices))
        root.subcommands.append(node)
    return root


def walk(command: CommandCompletion, path: tuple[str, ...] = ()):
    """(path, command) for the command and every command below it; the root's path is ()."""
    yield path, command
    for sub in command.subcommands:
        yield from walk(sub, (*path, sub.name))


# --- bash ---------------------------------------------------------------------------------------------------------

def bash_script(root: CommandCompletion) -> str:
    transitions, option_lists, value_cases = [], [], []
    for path, command in walk(root):
        key = " ".join(path)
        for sub in command.subcommands:
            transitions.append(f'            "{key}:{sub.name}") path="{" ".join((*path, sub.name))}" ;;')
        names = " ".join(name for option in command.options for name in option.names)
        words = " ".join([sub.name for sub in command.subcommands] + list(command.argument_choices))
        option_lists.append(f'        "{key}") options="{names}"; words="{words}" ;;')
        for option in command.options:
            if not option.takes_value:
                continue
            patterns = "|".join(f'"{key}:{name}"' for name in option.names)
            if option.choices:
                action = f'COMPREPLY=($(compgen -W "{" ".join(option.choices)}" -- "$cur"))'
            elif option.is_path:
                action = 'COMPREPLY=($(compgen -f -- "$cur"))'
            else:
                action = "COMPREPLY=()"
            value_cases.append(f"        {patterns}) {action}; return ;;")
    return "\n".join([
        "# bash completion for d3. Generated by `d3 completions bash` from the Typer app: do not edit.",
        "# Install: copy to ~/.local/share/bash-completion/completions/d3 (or source it from ~/.bashrc).",
        "_d3() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    local path="" options="" words="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "$path:${COMP_WORDS[i]}" in',
        *transitions,
        "        esac",
        "    done",
        '    case "$path:$prev" in',
        *value_cases,
        "    esac",
        '    case "$path" in',
        *option_lists,
        "    esac",
        '    if [[ "$cur" == -* ]]; then',
        '        COMPREPLY=($(compgen -W "$options" -- "$cur"))',
        "    else",
        '        COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "    fi",
        "}",
        "complete -F _d3 d3",
        "",
    ])


# --- zsh ----------------------------------------------------------------------------------------------------------

def _zsh_text(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")
    return text.replace("'", "'\\''")


def _value_spec(option: OptionCompletion, choices, path: str, value: str) -> str:
    """What a shell's completion says of an option's value: `choices(names)`, a `path`, any `value`, or nothing."""
    if option.choices:
        return choices(option.choices)
    if option.is_path:
        return path
    return value if option.takes_value else ""


def _zsh_option(option: OptionCompletion) -> list[str]:
    help_text = _zsh_text(option.help)
    value = _value_spec(option, lambda choices: f":value:({' '.join(choices)})", ":path:_files", ":value: ")
    exclusive = "" if option.repeatable else f"({' '.join(option.names)})"
    star = "*" if option.repeatable else ""
    return [f"'{exclusive}{star}{name}[{help_text}]{value}'" for name in option.names]


def _zsh_function(path: tuple[str, ...]) -> str:
    return "_d3" + "".join("_" + part.replace("-", "_") for part in path)


def zsh_script(root: CommandCompletion) -> str:
    lines = [
        "#compdef d3",
        "# zsh completion for d3. Generated by `d3 completions zsh` from the Typer app: do not edit.",
        "# Install: copy to a folder on $fpath as _d3 (e.g. ~/.zfunc/_d3 with fpath+=~/.zfunc), then compinit.",
        "",
    ]
    for path, command in walk(root):
        specs = [spec for option in command.options for spec in _zsh_option(option)]
        lines.append(f"{_zsh_function(path)}() {{")
        if command.subcommands:
            described = " ".join(f"'{sub.name}:{_zsh_text(sub.help)}'" for sub in command.subcommands)
            lines += [
                '    local curcontext="$curcontext" state line',
                "    local -a subcommands",
                f"    subcommands=({described})",
                "    _arguments -C \\",
                *[f"        {spec} \\" for spec in specs],
                "        '1: :->command' '*:: :->argument'",
                "    case $state in",
                "        command) _describe 'command' subcommands ;;",
                "        argument)",
                "            case $words[1] in",
                *[f"                {sub.name}) {_zsh_function((*path, sub.name))} ;;" for sub in command.subcommands],
                "            esac ;;",
                "    esac",
            ]
        else:
            argument = (f"'1::argument:({' '.join(command.argument_choices)})'" if command.argument_choices
                        else "'*::argument: '")
            lines += ["    _arguments -s \\", *[f"        {spec} \\" for spec in specs], f"        {argument}"]
        lines += ["}", ""]
    lines += ['if [ "$funcstack[1]" = "_d3" ]; then', '    _d3 "$@"', "else", "    compdef _d3 d3", "fi", ""]
    return "\n".join(lines)


# --- fish ---------------------------------------------------------------------------------------------------------

def _fish_text(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fish_script(root: CommandCompletion) -> str:
    lines = [
        "# fish completion for d3. Generated by `d3 completions fish` from the Typer app: do not edit.",
        "# Install: copy to ~/.config/fish/completions/d3.fish",
        "complete -c d3 -f",
    ]
    for path, command in walk(root):
        if not path:
            condition = "__fish_use_subcommand"
        else:
            condition = f"__fish_seen_subcommand_from {path[0]}"
            for part in path[1:]:
                condition += f"; and __fish_seen_subcommand_from {part}"
        if command.subcommands and path:
            names = " ".join(sub.name for sub in command.subcommands)
            sub_condition = f"{condition}; and not __fish_seen_subcommand_from {names}"
        else:
            sub_condition = condition
        for sub in command.subcommands:
            lines.append(f"complete -c d3 -n {_fish_text(sub_condition)} -a {sub.name} -d {_fish_text(sub.help)}")
        if command.argument_choices:
            choices = _fish_text(" ".join(command.argument_choices))
            lines.append(f"complete -c d3 -n {_fish_text(condition)} -a {choices}")
        for option in command.options:
            flags = []
            for name in option.names:
                flags.append(f"-l {name[2:]}" if name.startswith("--") else f"-s {name[1:]}")
            value = _value_spec(option, lambda choices: f" -x -a {_fish_text(' '.join(choices))}", " -r -F", " -x")
            lines.append(f"complete -c d3 -n {_fish_text(sub_condition)} {' '.join(flags)}{value} "
                         f"-d {_fish_text(option.help)}")
    return "\n".join(lines) + "\n"


SHELLS = {"bash": bash_script, "zsh": zsh_script, "fish": fish_script}
FILE_NAMES = {"bash": "d3.bash", "zsh": "d3.zsh", "fish": "d3.fish"}


def script(app, shell: str) -> str:
    return SHELLS[shell](app_completion(app))
