"""Command-line options that several subcommands share, declared once. No torch here.

Each option's type, flags and help is one `Annotated` alias; the options that travel together (the model's, the
depth schedule's, sampling's) are one dataclass each, an option group. A command names a group as one parameter
(`model: ModelArgs`) and `@uses_option_groups` spreads the group's fields into the command line, in that place, and
hands the command the filled-in dataclass.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from d3cli.base.errors import UserError
from d3cli.core.decode.schedule import (
    DEFAULT_ALPHA,
    DEFAULT_HEAD,
    DEFAULT_MIN_LAYERS,
    DEFAULT_SKIP_ORDER,
    DEFAULT_TAIL,
    DEFAULT_WARMUP,
    SKIP_ORDER_NAMES,
    check_alpha,
)
from d3cli.core.model.choices import DEVICE_MAPS, DEVICES, DTYPE_HELP, DTYPES, WEIGHT_KINDS, WEIGHTS_HELP
from d3cli.core.session.settings import DEFAULT_MAX_NEW_TOKENS

MODEL_PANEL = "Model"
SCHEDULE_PANEL = "Depth decay"
SAMPLING_PANEL = "Sampling and length"
OUTPUT_PANEL = "Output"
TASK_PANEL = "Task"


Device = Enum("Device", {name: name for name in DEVICES}, type=str)  # each from core.model.choices' one list
DType = Enum("DType", {name: name for name in DTYPES}, type=str)
DeviceMap = Enum("DeviceMap", {name: name for name in DEVICE_MAPS}, type=str)
Weights = Enum("Weights", {name: name for name in WEIGHT_KINDS}, type=str)


SkipOrderChoice = Enum("SkipOrderChoice", {name: name for name in SKIP_ORDER_NAMES}, type=str)


def flag(name: str, help: str, panel: str = OUTPUT_PANEL):
    """A command's on/off option (`--json`, `--resume`, ...) with its own help line: declared in one line each."""
    return Annotated[bool, typer.Option(name, help=help, rich_help_panel=panel)]


def batch_size_option(help: str, panel: str = OUTPUT_PANEL):
    """`--batch-size`/`-b`, with what a batch is for this command."""
    return Annotated[int, typer.Option("--batch-size", "-b", help=help, rich_help_panel=panel)]


def output_option(help: str):
    """`--output`/`-o`: a file this command writes."""
    return Annotated[Optional[Path], typer.Option("--output", "-o", help=help, rich_help_panel=OUTPUT_PANEL,
                                                  show_default=False)]



def option(kind, help: str, panel: str, show_default: bool = True):
    """Any other option of one command, declared in one line: its type, its help and the panel it shows in."""
    return Annotated[kind, typer.Option(help=help, rich_help_panel=panel, show_default=show_default)]


ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m",
        help="Hugging Face model id, model folder or .gguf file. Default: the embedded SmolLM2-135M-Instruct.",
        rich_help_panel=MODEL_PANEL, show_default=False,
    ),
]
DeviceOption = option(Device, "Where to run: auto picks cuda, then mps, then cpu.", MODEL_PANEL)
DTypeOption = option(DType, DTYPE_HELP, MODEL_PANEL)
WeightsOption = option(Weights, WEIGHTS_HELP, MODEL_PANEL)
GroupSizeOption = option(int, "Weights per int4 group when float weights are quantized on load: 32, 64, 128 or 256.",
                              MODEL_PANEL)
DeviceMapOption = option(Optional[DeviceMap], "Spread a model too large for one device over all devices (accelerate).",
                                              MODEL_PANEL, show_default=False)
ServerOption = option(
    Optional[str], "A running `d3 serve` of the same model to send the prompts to (http://HOST:PORT, HOST:PORT or a "
                   "port; also D3_SERVER): nothing loads here, the replies and their statistics are the server's. "
                   "Its API key: D3_API_KEY.", MODEL_PANEL, show_default=False)
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow a model repository's own Python code to run.",
                 rich_help_panel=MODEL_PANEL),
]

AlphaOption = Annotated[
    Optional[float],
    typer.Option("--alpha", "-a", help="Decay rate α in (0, 1]: token i runs floor(L·α^i) layers. 1 = no skipping. "
                                       "Default: the α the model's calibration chose, else "
                                       f"{DEFAULT_ALPHA:g} (full depth).",
                 rich_help_panel=SCHEDULE_PANEL, show_default=False),
]
AlphaListOption = Annotated[
    Optional[str],
    typer.Option("--alpha", "-a", help="D3 decay rates, comma-separated: one D3 run (and its matched baselines) each. "
                                       "Default: the model's own schedule (calibrated, else d3's default).",
                 rich_help_panel=SCHEDULE_PANEL, show_default=False),
]
ProfileAlphasOption = Annotated[
    Optional[str],
    typer.Option("--alpha", "-a", help="Also profile D3 at these decay rates (comma-separated).",
                 rich_help_panel=SCHEDULE_PANEL, show_default=False),
]
MinLayersOption = option(
    Optional[str], "Floor on the layers per token: a count (24) or a fraction of L (0.8). Default: the floor the "
                   f"model's calibration chose, else {DEFAULT_MIN_LAYERS} of L.", SCHEDULE_PANEL, show_default=False)
WarmupOption = option(int, "Generated tokens that run at full depth before the decay starts.", SCHEDULE_PANEL)
HeadOption = option(str, "First layers that always run: a count or a fraction of L.", SCHEDULE_PANEL)
TailOption = option(str, "Last layers that always run: a count or a fraction of L.", SCHEDULE_PANEL)
SkipOrderOption = option(
    SkipOrderChoice, "Which flex layers go first: importance (least important first, from the model's calibration "
                     "or --profile), middle (centre outward), late (deepest first); auto is importance when the "
                     "model is calibrated, else middle.", SCHEDULE_PANEL)
ProfileOption = option(
    Optional[Path], "Layer profile for --skip-order importance (from d3 profile-ppl --save-profile).",
                    SCHEDULE_PANEL, show_default=False)
CalibrationOption = option(
    Optional[Path], "The model's calibration file (from d3 calibrate). Default: the one d3 calibrate cached for "
                    "this model, or the bundled one of the embedded model.", SCHEDULE_PANEL, show_default=False)
BridgesOption = Annotated[
    bool,
    typer.Option("--bridges/--no-bridges", help="Stand in for skipped layers with the calibration's fitted linear "
                 "bridges (--no-bridges: skip them plainly).", rich_help_panel=SCHEDULE_PANEL),
]

MaxNewTokensOption = Annotated[
    int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per reply.",
                      rich_help_panel=SAMPLING_PANEL),
]
AnswerTokensOption = Annotated[
    int, typer.Option("--max-new-tokens", "-n", help="Most tokens per answer.", rich_help_panel=SAMPLING_PANEL),
]
TemperatureOption = Annotated[
    float, typer.Option("--temperature", "-t", help="0 = greedy; above 0 samples.", rich_help_panel=SAMPLING_PANEL)
]
TopKOption = option(int, "Sample only from the k most likely tokens (0 = off).", SAMPLING_PANEL)
TopPOption = option(float, "Sample only from the most likely tokens whose probability reaches p.", SAMPLING_PANEL)
SeedOption = option(Optional[int], "Seed for sampling, for a reproducible reply.", SAMPLING_PANEL, show_default=False)
StopOption = Annotated[
    Optional[list[str]],
    typer.Option("--stop", help="Stop when this text appears (repeatable); the text ends before it.",
                 rich_help_panel=SAMPLING_PANEL, show_default=False),
]
ChatOption = Annotated[
    Optional[bool],
    typer.Option("--chat/--no-chat", help="Wrap the prompt in the tokenizer's chat template. Default: on if it has "
                 "one.", rich_help_panel=SAMPLING_PANEL, show_default=False),
]
SystemOption = Annotated[
    Optional[str], typer.Option("--system", "-s", help="System message for the chat template.",
                                rich_help_panel=SAMPLING_PANEL, show_default=False),
]

SubtasksOption = option(Optional[str], "BBH subtasks, comma-separated (default: all 27).",
                                       TASK_PANEL, show_default=False)
ShotsOption = option(Optional[int], "Few-shot exemplars (gsm8k: 8, bbh: 3).", TASK_PANEL, show_default=False)
TaskChatOption = Annotated[
    bool, typer.Option("--chat", help="Zero-shot through the model's chat template instead of few-shot.",
                       rich_help_panel=TASK_PANEL),
]
DataDirOption = option(Optional[Path], "Folder with gsm8k/ and bbh/ (default: $D3_DATA_DIR, else a download cache "
                                       "under ~/.cache/d3/data).", TASK_PANEL, show_default=False)


class OptionGroup:
    """Base of the option groups: a frozen dataclass whose fields are command-line options."""

    FIXED: dict[str, object] = {}  # settings a group's command fixes rather than asks for

    def values(self, **changes) -> dict[str, object]:
        """The fields by name (for `DecodeSettings.from_options`), the group's fixed settings, then `changes`."""
        return {**{field.name: getattr(self, field.name) for field in dataclasses.fields(self)}, **self.FIXED,
                **changes}


@dataclasses.dataclass(frozen=True)
class ModelArgs(OptionGroup):
    """Which model, where, with which weights: --model, --device, --dtype, --device-map, --trust-remote-code,
    --weights, --group-size."""

    model: ModelOption = None
    device: DeviceOption = "auto"
    dtype: DTypeOption = "auto"
    device_map: DeviceMapOption = None
    trust_remote_code: TrustRemoteCodeOption = False
    weights: WeightsOption = "auto"
    group_size: GroupSizeOption = 32

    def served_model(self) -> str | None:
        """--model for `--server` (the model the server must serve; None: whatever it serves), once no other model
        option is set: a served model runs as `d3 serve` was told."""
        changed = ["--" + item.name.replace("_", "-") for item in dataclasses.fields(self) if item.name != "model"
                   and getattr(getattr(self, item.name), "value", getattr(self, item.name)) != item.default]
        if changed:
            raise UserError(f"{', '.join(changed)}: the server runs its model as `d3 serve` was told; leave "
                            f"{'it' if len(changed) == 1 else 'them'} out with --server")
        return self.model

    def options(self, lean: bool = False):
        """The loader's `ModelOptions` of these arguments; `lean` for a command that only decodes (d3's own model
        where a GGUF start was recorded: loader.ModelOptions.lean)."""
        from d3cli.core.model.loader import ModelOptions

        return ModelOptions(self.model, self.device, self.dtype, self.device_map, self.trust_remote_code,
                            self.weights, self.group_size, lean=lean)


@dataclasses.dataclass(frozen=True)
class DepthArgs(OptionGroup):
    """The depth schedule: --alpha, --min-layers, --warmup, --head, --tail, --skip-order, --profile, --calibration,
    --bridges."""

    alpha: AlphaOption = None
    min_layers: MinLayersOption = None
    warmup: WarmupOption = DEFAULT_WARMUP
    head: HeadOption = DEFAULT_HEAD
    tail: TailOption = DEFAULT_TAIL
    skip_order: SkipOrderOption = DEFAULT_SKIP_ORDER
    profile: ProfileOption = None
    calibration: CalibrationOption = None
    bridges: BridgesOption = True


@dataclasses.dataclass(frozen=True)
class AlphaListDepthArgs(DepthArgs):
    """bench: the schedule options with --alpha a comma-separated list of rates (a field redefined keeps its place)."""

    alpha: AlphaListOption = None


@dataclasses.dataclass(frozen=True)
class ProfileDepthArgs(DepthArgs):
    """profile-ppl: the schedule options with --alpha an optional list of rates to profile besides full depth."""

    alpha: ProfileAlphasOption = None


@dataclasses.dataclass(frozen=True)
class SamplingArgs(OptionGroup):
    """Length, sampling and stops of a reply: --max-new-tokens, --temperature, --top-k, --top-p, --seed, --stop."""

    max_new_tokens: MaxNewTokensOption = DEFAULT_MAX_NEW_TOKENS
    temperature: TemperatureOption = 0.0
    top_k: TopKOption = 0
    top_p: TopPOption = 1.0
    seed: SeedOption = None
    stop: StopOption = None


@dataclasses.dataclass(frozen=True)
class AnswerSamplingArgs(OptionGroup):
    """bench: each task answer's length and sampling: --max-new-tokens, --temperature, --seed (no top-k/top-p, no
    stops: a task brings its own)."""

    max_new_tokens: AnswerTokensOption = DEFAULT_MAX_NEW_TOKENS
    temperature: TemperatureOption = 0.0
    seed: SeedOption = None

    FIXED = {"top_k": 0, "top_p": 1.0, "stop": None}


def _is_option_group(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, OptionGroup)


def uses_option_groups(command):
    """`command` as Typer should see it: each parameter annotated with an option group replaced by the group's
    fields (same names, types, flags and defaults, in the group's place); called, the fields are gathered back into
    the group's dataclass."""
    hints = typing.get_type_hints(command, include_extras=True)
    parameters: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for name, parameter in inspect.signature(command).parameters.items():
        annotation = hints.get(name, parameter.annotation)
        if not _is_option_group(annotation):
            parameters.append(parameter.replace(annotation=annotation))
            continue
        groups[name] = annotation
        field_hints = typing.get_type_hints(annotation, include_extras=True)
        parameters += [inspect.Parameter(field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=field.default,
                                         annotation=field_hints[field.name])
                       for field in dataclasses.fields(annotation)]
    names = [parameter.name for parameter in parameters]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise TypeError(f"{command.__name__}: option groups repeat {', '.join(repeated)}")

    @functools.wraps(command)
    def with_groups(**arguments):
        for name, group in groups.items():
            arguments[name] = group(**{field.name: arguments.pop(field.name) for field in dataclasses.fields(group)})
        return command(**arguments)

    del with_groups.__wrapped__  # Typer must read the spread signature, not the command's own
    with_groups.__signature__ = inspect.Signature(parameters, return_annotation=None)
    with_groups.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return with_groups


def parse_alphas(text: str) -> tuple[float, ...]:
    """`--alpha 0.98,0.99` (bench, profile-ppl): the distinct rates in order, each checked as the schedule checks it."""
    try:
        alphas = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--alpha takes numbers separated by commas, like 0.98,0.99, not {text!r}") from None
    if not alphas:
        raise UserError("--alpha needs at least one value")
    for alpha in alphas:
        check_alpha(alpha)
    return tuple(dict.fromkeys(alphas))


def parse_list(text: str | None) -> tuple[str, ...]:
    """A comma-separated option (`--methods`, `--subtasks`) as its non-empty parts."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())
