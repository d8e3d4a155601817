"""The model options' choices, defined once: the CLI's enums list exactly them, the kinds they name are the ones the
loader and weight_choice.py know, and importing them imports nothing (the CLI builds its options without torch)."""

import subprocess
import sys

import pytest

from d3cli.core.model.choices import DEVICE_MAPS, DEVICES, DTYPES, WEIGHT_KINDS


def test_importing_the_choices_imports_nothing_else():
    code = ("import sys; import d3cli.core.model.choices; "
            "print(sorted(name for name in sys.modules if name.startswith(('d3cli', 'torch', 'transformers'))))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "['d3cli', 'd3cli.core', 'd3cli.core.model', 'd3cli.core.model.choices']"


@pytest.mark.parametrize("option, choices", [("--device", DEVICES), ("--dtype", DTYPES),
                                             ("--device-map", DEVICE_MAPS), ("--weights", WEIGHT_KINDS)])
def test_the_command_line_offers_exactly_these_choices_in_this_order(cli, option, choices):
    result = cli(["generate", option, "nonsense", "Hello"])
    assert result.exit_code == 2
    assert f"'nonsense' is not one of {', '.join(map(repr, choices))}." in result.stderr


def test_every_kind_is_one_the_weights_and_the_loader_resolve():
    import torch

    from d3cli.core.model.loader import ModelOptions, resolve_dtype
    from d3cli.core.model.weight_choice import DENSE_KINDS, QUANTIZED_KINDS

    assert DTYPES == ("auto", *DENSE_KINDS)
    assert WEIGHT_KINDS == ("auto", *DENSE_KINDS, *QUANTIZED_KINDS)
    assert [resolve_dtype(dtype, torch.device("cpu")) for dtype in DENSE_KINDS] == [
        torch.float32, torch.bfloat16, torch.float16]
    defaults = ModelOptions()
    assert (defaults.device, defaults.dtype, defaults.weights) == (DEVICES[0], DTYPES[0], WEIGHT_KINDS[0]) == (
        "auto", "auto", "auto")
    for weights in WEIGHT_KINDS:  # each choice passes the one check where the options are built
        assert ModelOptions(weights=weights).weights == weights
