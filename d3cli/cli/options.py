"""Command-line options that several subcommands share, declared once. No torch here."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from d3cli.core.errors import UserError
from d3cli.core.schedule import SKIP_ORDER_NAMES, check_alpha

MODEL_PANEL = "Model"
SCHEDULE_PANEL = "Depth decay"
SAMPLING_PANEL = "Sampling and length"
OUTPUT_PANEL = "Output"
TASK_PANEL = "Task"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class DeviceMap(str, Enum):
    auto = "auto"


SkipOrderChoice = Enum("SkipOrderChoice", {name: name for name in SKIP_ORDER_NAMES}, type=str)

ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m",
        help="Hugging Face model id, model folder or .gguf file. Default: the embedded SmolLM2-135M-Instruct.",
        rich_help_panel=MODEL_PANEL, show_default=False,
    ),
]
DeviceOption = Annotated[
    Device, typer.Option(help="Where to run: auto picks cuda, then mps, then cpu.", rich_help_panel=MODEL_PANEL)
]
DTypeOption = Annotated[
    DType,
    typer.Option(help="Weights dtype: auto is float32 on CPU, bfloat16 (or float16) on GPU.",
                 rich_help_panel=MODEL_PANEL),
]
DeviceMapOption = Annotated[
    Optional[DeviceMap],
    typer.Option(help="Spread a model too large for one device over all devices (accelerate).",
                 rich_help_panel=MODEL_PANEL, show_default=False),
]
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow a model repository's own Python code to run.",
                 rich_help_panel=MODEL_PANEL),
]

AlphaOption = Annotated[
    float,
    typer.Option("--alpha", "-a", help="Decay rate α in (0, 1]: token i runs floor(L·α^i) layers. 1 = no skipping.",
                 rich_help_panel=SCHEDULE_PANEL),
]
MinLayersOption = Annotated[
    str,
    typer.Option(help="Floor on the layers per token: a count (24) or a fraction of L (0.8).",
                 rich_help_panel=SCHEDULE_PANEL),
]
WarmupOption = Annotated[
    int, typer.Option(help="Generated tokens that run at full depth before the decay starts.",
                      rich_help_panel=SCHEDULE_PANEL),
]
HeadOption = Annotated[
    str, typer.Option(help="First layers that always run: a count or a fraction of L.", rich_help_panel=SCHEDULE_PANEL)
]
TailOption = Annotated[
    str, typer.Option(help="Last layers that always run: a count or a fraction of L.", rich_help_panel=SCHEDULE_PANEL)
]
SkipOrderOption = Annotated[
    SkipOrderChoice,
    typer.Option(help="Which flex layers go first: importance (least important first, from the model's calibration "
                      "or --profile), middle (centre outward), late (deepest first); auto is importance when the "
                      "model is calibrated, else middle.",
                 rich_help_panel=SCHEDULE_PANEL),
]
ProfileOption = Annotated[
    Optional[Path],
    typer.Option(help="Layer profile for --skip-order importance (from d3 profile-ppl --save-profile).",
                 rich_help_panel=SCHEDULE_PANEL, show_default=False),
]
CalibrationOption = Annotated[
    Optional[Path],
    typer.Option(help="The model's calibration file (from d3 calibrate). Default: the one d3 calibrate cached for "
                      "this model, or the bundled one of the embedded model.",
                 rich_help_panel=SCHEDULE_PANEL, show_default=False),
]
BridgesOption = Annotated[
    bool,
    typer.Option("--bridges/--no-bridges", help="Stand in for skipped layers with the calibration's fitted linear "
                 "bridges (--no-bridges: skip them plainly).", rich_help_panel=SCHEDULE_PANEL),
]

MaxNewTokensOption = Annotated[
    int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per reply.",
                      rich_help_panel=SAMPLING_PANEL),
]
TemperatureOption = Annotated[
    float, typer.Option("--temperature", "-t", help="0 = greedy; above 0 samples.", rich_help_panel=SAMPLING_PANEL)
]
TopKOption = Annotated[
    int, typer.Option(help="Sample only from the k most likely tokens (0 = off).", rich_help_panel=SAMPLING_PANEL)
]
TopPOption = Annotated[
    float, typer.Option(help="Sample only from the most likely tokens whose probability reaches p.",
                        rich_help_panel=SAMPLING_PANEL),
]
SeedOption = Annotated[
    Optional[int], typer.Option(help="Seed for sampling, for a reproducible reply.", rich_help_panel=SAMPLING_PANEL,
                                show_default=False),
]
StopOption = Annotated[
    Optional[list[str]],
    typer.Option("--stop", help="Stop when this text appears (repeatable); the text ends before it.",
                 rich_help_panel=SAMPLING_PANEL, show_default=False),
]
ChatOption = Annotated[
    Optional[bool],
    typer.Option("--chat/--no-chat", help="Wrap the prompt in the tokenizer's chat template. Default: on if it has one.",
                 rich_help_panel=SAMPLING_PANEL, show_default=False),
]
SystemOption = Annotated[
    Optional[str], typer.Option("--system", "-s", help="System message for the chat template.",
                                rich_help_panel=SAMPLING_PANEL, show_default=False),
]

SubtasksOption = Annotated[
    Optional[str], typer.Option(help="BBH subtasks, comma-separated (default: all 27).", rich_help_panel=TASK_PANEL,
                                show_default=False),
]
ShotsOption = Annotated[
    Optional[int], typer.Option(help="Few-shot exemplars (gsm8k: 8, bbh: 3).", rich_help_panel=TASK_PANEL,
                                show_default=False),
]
TaskChatOption = Annotated[
    bool, typer.Option("--chat", help="Zero-shot through the model's chat template instead of few-shot.",
                       rich_help_panel=TASK_PANEL),
]
DataDirOption = Annotated[
    Optional[Path], typer.Option(help="Folder with gsm8k/ and bbh/ (default: $D3_DATA_DIR, else a download cache "
                                      "under ~/.cache/d3/data).", rich_help_panel=TASK_PANEL, show_default=False),
]


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
