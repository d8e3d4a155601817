import pytest

from d3cli.base.errors import UserError
from d3cli.cli.options import parse_alphas, parse_list


def test_alphas_keep_their_order_without_repeats():
    assert parse_alphas("0.99, 0.98,0.99,") == (0.99, 0.98)


@pytest.mark.parametrize(("text", "message"), [
    ("0.98,fast", "--alpha takes numbers separated by commas"),
    (" , ", "--alpha needs at least one value"),
    ("0.98,1.5", r"alpha must lie in \(0, 1\], not 1.5"),
    ("0", r"alpha must lie in \(0, 1\], not 0"),
    ("nan", "alpha must be a number in"),
])
def test_a_bad_alpha_list_is_the_schedules_own_error(text, message):
    with pytest.raises(UserError, match=message):
        parse_alphas(text)


def test_lists_drop_blanks_and_spaces():
    assert parse_list(" d3, static+bridges,,") == ("d3", "static+bridges")
    assert parse_list(None) == ()


def test_an_option_group_is_spread_in_its_place_and_gathered_back():
    import inspect
    from typing import Annotated

    import typer

    from d3cli.cli.options import DepthArgs, ModelArgs, uses_option_groups

    seen = {}

    @uses_option_groups
    def command(first: Annotated[int, typer.Option()] = 1, model: ModelArgs = ModelArgs(),
                depth: DepthArgs = DepthArgs(), last: Annotated[bool, typer.Option()] = False):
        seen.update(first=first, model=model, depth=depth, last=last)

    names = list(inspect.signature(command).parameters)
    assert names == ["first", "model", "device", "dtype", "device_map", "trust_remote_code", "weights",
                     "group_size", "alpha", "min_layers",
                     "warmup", "head", "tail", "skip_order", "profile", "calibration", "bridges", "last"]
    defaults = {name: parameter.default for name, parameter in inspect.signature(command).parameters.items()}
    command(**{**defaults, "model": "m.gguf", "alpha": 0.9, "last": True})
    assert seen["model"] == ModelArgs(model="m.gguf") and seen["depth"] == DepthArgs(alpha=0.9)
    assert seen["first"] == 1 and seen["last"] is True
    assert seen["model"].options().cli_args()[:2] == ["--model", "m.gguf"]


def test_option_groups_that_repeat_a_name_are_refused():
    from typing import Annotated

    import typer

    from d3cli.cli.options import ModelArgs, uses_option_groups

    def command(model: ModelArgs = ModelArgs(), device: Annotated[str, typer.Option()] = "cpu"):
        pass

    with pytest.raises(TypeError, match="repeat device"):
        uses_option_groups(command)


def test_no_command_spells_out_an_option_that_a_group_declares():
    """A command that declares --model or --min-layers itself drifts from the others: the options of the model, the
    depth schedule and sampling reach commands only through ModelArgs, DepthArgs and SamplingArgs."""
    import ast
    from pathlib import Path

    import d3cli.cli.options as options

    group_aliases = {name for name in dir(options) if name.endswith("Option") and any(
        f": {name} =" in line for line in Path(options.__file__).read_text().splitlines() if line.startswith("    "))}
    assert {"ModelOption", "AlphaOption", "MinLayersOption", "StopOption"} <= group_aliases
    commands = Path(options.__file__).parent / "commands"
    for path in commands.glob("*.py"):
        named = {node.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Name)}
        assert not named & group_aliases, (path.name, sorted(named & group_aliases))
