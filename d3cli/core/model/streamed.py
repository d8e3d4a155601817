"""A model built without weights and filled from a weight source one tensor at a time: the shared part of loading a
GGUF file (gguf_weights.GGUFWeights) and a folder of safetensors shards (`SafetensorsWeights`), so that no path
makes a float copy of the whole model before choosing the weights' kind.

    fill_model(model, source, choice)   every parameter that is not a decoder layer's or the LM head's linear weight
                                        (norms, biases, other layers) read now, each alone; then
                                        weights.apply_weights builds the linear layers and the embedding table
                                        layer by layer from the source, releasing each layer's tensors
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from pathlib import Path

import torch
from torch import nn

from d3cli.base.errors import UserError
from d3cli.core.model.model_facts import find_decoder_layers
from d3cli.core.model.weight_choice import WeightsReport
from d3cli.core.model.weights import ModelWeights, apply_weights, embedding_name, head_name


def quiet_transformers() -> None:
    """No per-load progress bars or advice from transformers: d3 owns the terminal (download bars stay)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def empty_model(config, trust_remote_code: bool = False):
    """The model of `config` with its parameters on the meta device (no memory); buffers (rotary tables) real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)


def fill_model(model: nn.Module, source, choice, fuse: bool = True, what: str = "the model",
               progress=None) -> WeightsReport:
    """Fill `model` (its parameters on the meta device) from `source` with `choice`; `what` names the files in
    errors. A file without an LM head of its own ties it to the embedding table."""
    head, embedding = head_name(model), embedding_name(model)
    if head is not None and embedding is not None and f"{head}.weight" not in source:
        model.get_submodule(head).weight = model.get_submodule(embedding).weight
    layers = find_decoder_layers(model)
    in_layers = {id(module) for module in layers.modules()}
    built_later = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)
                   and (name == head or id(module) in in_layers)}
    built_later.add(f"{embedding}.weight")
    for name, parameter in list(model.named_parameters()):
        if name in built_later:
            continue
        if name not in source:
            raise UserError(f"{what} has no tensor for {name}: the files are incomplete or not of the architecture "
                            "their config names")
        module_name, _, attribute = name.rpartition(".")
        values = source.values(name)
        if values.numel() != parameter.numel():
            raise UserError(f"{what}: the tensor for {name} holds {values.numel()} values where the model needs "
                            f"{parameter.numel()}: the files and their config disagree")
        setattr(model.get_submodule(module_name), attribute,
                nn.Parameter(values.reshape(parameter.shape), requires_grad=False))
    source.release()
    model.to(choice.dtype)
    return apply_weights(model, choice, source=source, fuse=fuse, progress=progress)


def return_freed_memory() -> None:
    """Hand memory freed by the layer just built back to the system (glibc keeps freed blocks of a few MB in its
    heap otherwise, and the process's peak grows with every layer's temporaries)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


class SafetensorsWeights(ModelWeights):
    """A Hugging Face folder's safetensors shards as a weight source: each tensor read when its module is built, in
    float32, and a linear weight re-quantized a slice of rows at a time. A shard is mapped only while a tensor is
    read from it (a mapping kept open would keep every page read in the process's memory)."""

    ROWS_AT_ONCE = 1024

    def __init__(self, files: list[Path]):
        super().__init__()
        from safetensors import safe_open

        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    self.where[key] = str(path)
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())
        self.aliases: dict[str, str] = {}

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.where

    def numel(self) -> int:
        """How many values the shards hold."""
        total = 0
        for shape in self.shapes.values():
            count = 1
            for size in shape:
                count *= size
            total += count
        return total

    def tie(self, head: str, embedding: str) -> None:
        if head not in self.where:
            self.aliases[head] = embedding

    def _key(self, name: str) -> str:
        key = self.aliases.get(name, name)
        if key not in self.where:
            raise UserError(f"the model's files have no tensor for {name}")
        return key

    def values(self, name: str, module: nn.Module | None = None) -> torch.Tensor:
        from safetensors import safe_open

        key = self._key(name)
        with safe_open(self.where[key], framework="pt") as handle:
            return handle.get_tensor(key).float()

    def release(self) -> None:
        return_freed_memory()

    def row_slices(self, name: str, module: nn.Module | None = None):
        from safetensors import safe_open

        key = self._key(name)
        rows = self.shapes[key][0]
        for start in range(0, rows, self.ROWS_AT_ONCE):
            with safe_open(self.where[key], framework="pt") as handle:
                part = handle.get_slice(key)[start:start + self.ROWS_AT_ONCE].float()
            yield part


def safetensors_files(folder: Path) -> list[Path] | None:
    """The folder's safetensors shards (those its index names, else every *.safetensors), or None without any."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            return None
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    return files or None


def load_folder(folder: Path, source: SafetensorsWeights, config, choice, device, fuse: bool,
                trust_remote_code: bool, progress=None):
    """A Hugging Face folder's model built empty and filled from its safetensors shards (no float copy first), or
    None when the shards do not name every parameter as the model does (transformers' own loader then renames)."""
    from transformers import GenerationConfig

    model = empty_model(config, trust_remote_code)
    tied = {f"{head_name(model)}.weight"} if head_name(model) else set()
    missing = [name for name, _ in model.named_parameters(remove_duplicate=False)
               if name not in source and name not in tied]
    if missing:
        return None
    report = fill_model(model, source, choice, fuse, what=str(folder), progress=progress)
    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    except OSError:
        model.generation_config = GenerationConfig.from_model_config(config)
    return model.to(device).eval(), report
