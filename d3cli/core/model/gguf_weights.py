"""A GGUF file's weights read straight from the file, one tensor at a time: no float copy of the model.

The model is built without weights (its parameters on the meta device), then each tensor is read from the file when
its module is built (weights.apply_weights goes one decoder layer at a time and releases what it read):

    a linear weight of a stored type   its bytes (Q4_0 … Q8_0, Q4_K, Q5_K, Q6_K; rows reordered as transformers'
                                       tensor processor reorders them), packed straight into d3's tiles
                                       (gguf_tiles.py), or mapped from the tiles a first run kept (tile_cache.py)
    the embedding table                its bytes, memory-mapped: a lookup dequantizes only the rows it reads
    anything else                      that tensor alone dequantized (the gguf package's dequantization, then
                                       transformers' tensor processor: exactly what transformers' GGUF loader
                                       makes of it), and freed once its module is built

So loading needs about the file's size plus one tensor in float32, where transformers' loader dequantizes the whole
model to float32 first (27 GB for a 7B file). tests/core/model/test_gguf_weights.py holds the result against
transformers' own reading of the same files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from d3cli import kernels
from d3cli.base.errors import UserError
from d3cli.core.model import d3_record, tile_cache
from d3cli.core.model.d3_model import D3Config, D3ForCausalLM
from d3cli.core.model.embeddings import BlockInt8Embedding, QuantizedEmbedding
from d3cli.core.model.gguf_blocks import (
    FLOAT_TYPES,
    KEEPS_ROWS,
    GGUFHeader,
    TensorInfo,
    dequantized,
    row_order,
)
from d3cli.core.model.gguf_cache import gguf_names, tensor_processor
from d3cli.core.model.gguf_tiles import PACKED_TYPES, GGUFBlocks
from d3cli.core.model.streamed import empty_model, fill_model, return_freed_memory
from d3cli.core.model.weights import ModelWeights, _embed_scale
from d3cli.core.text.d3_tokenizer import D3Tokenizer

ROWS_AT_ONCE = 1024  # rows of a tensor dequantized at once


class GGUFWeights(ModelWeights):
    """The weight source of a model read from a GGUF file (see the module docstring): `form(name)` and
    `values(name)` read the tensor of parameter `name` when asked, and keep it until `release()`."""

    def __init__(self, header: GGUFHeader, names: dict[str, str], processor):
        super().__init__()
        self.path = header.tensors[0].path if header.tensors else ""
        self.names, self.processor = names, processor
        self.tensors: dict[str, TensorInfo] = {}
        for tensor in header.tensors:
            name = names.get(tensor.name)
            if name is not None:
                self.tensors[name] = tensor
        self.types = {name: tensor.type_name for name, tensor in self.tensors.items()}
        self.aliases: dict[str, str] = {}
        self._read: dict[str, object] = {}
        self._orders: dict[str, object] = {}  # GGUF name -> row_order's verdict, found once

    def order(self, tensor: TensorInfo):
        """What transformers' processor does to this tensor's rows (gguf_blocks.row_order), probed once."""
        if tensor.name not in self._orders:
            self._orders[tensor.name] = row_order(self.processor, tensor.name, tensor.rows, self.names)
        return self._orders[tensor.name]

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.tensors

    def tensor(self, name: str) -> TensorInfo:
        tensor = self.tensors.get(self.aliases.get(name, name))
        if tensor is None:
            raise UserError(f"{self.path} has no tensor for {name}: the file is incomplete or not of the "
                            "architecture its metadata names")
        return tensor

    def tie(self, head: str, embedding: str) -> None:
        if head not in self.tensors:  # a file with its own output.weight keeps it
            self.aliases[head] = embedding
            if embedding in self.types:
                self.types[head] = self.types[embedding]

    def form(self, name: str):
        key = ("form", self.aliases.get(name, name))
        if key not in self._read:
            self._read[key] = self._form(self.aliases.get(name, name))
        return self._read[key]

    def _form(self, name: str):
        tensor = self.tensors.get(name)
        if tensor is None or tensor.type_name not in PACKED_TYPES or len(tensor.shape) != 2:
            return None
        if tensor.columns % 32:
            return None
        order = self.order(tensor)
        if order is None:  # the processor changes more than the row order: dequantized and processed instead
            return None
        raw = self._bytes(tensor)
        return GGUFBlocks(raw if order is KEEPS_ROWS else raw[order.numpy()], tensor.type_name, tensor.rows,
                          tensor.columns)

    def values(self, name: str, module: nn.Module | None = None) -> torch.Tensor:
        """The tensor of parameter `name` dequantized and processed as transformers' GGUF loader does, float32."""
        key = ("values", self.aliases.get(name, name))
        if key not in self._read:
            self._read[key] = self._values(self.tensor(name))
        return self._read[key]

    def row_slices(self, name: str, module: nn.Module | None = None):
        """The values of a 2-D weight that the processor leaves as it is, dequantized ROWS_AT_ONCE rows at a time
        (nothing kept); other tensors whole, as `values`."""
        tensor = self.tensor(name)
        if len(tensor.shape) != 2 or self.order(tensor) is not KEEPS_ROWS:
            yield self.values(name, module)
            return
        for start in range(0, tensor.rows, ROWS_AT_ONCE):
            rows = tensor.read_rows(start, min(tensor.rows, start + ROWS_AT_ONCE))
            yield dequantized(rows, tensor.type_name).reshape(-1, tensor.columns)

    def _values(self, tensor: TensorInfo) -> torch.Tensor:
        raw = self._bytes(tensor)
        values = np.empty((tensor.rows, tensor.columns), dtype=np.float32)
        try:  # in slices of rows: the gguf package's dequantization makes several temporaries of its input's size
            for start in range(0, tensor.rows, ROWS_AT_ONCE):
                rows = dequantized(raw[start:start + ROWS_AT_ONCE], tensor.type_name)
                values[start:start + ROWS_AT_ONCE] = rows.numpy().reshape(-1, tensor.columns)
        except NotImplementedError:
            raise UserError(f"{self.path}: tensor {tensor.name} is of GGML type {tensor.type_name}, which neither "
                            "d3 nor the gguf package can read; convert the file with another type") from None
        del raw
        values = values.reshape(tensor.shape)
        processed = self.processor.process(weights=values, name=tensor.name, tensor_key_mapping=self.names,
                                           parsed_parameters={"tensors": {}, "config": {}})
        if processed.name != tensor.name:
            raise UserError(f"{self.path}: d3 reads GGUF files tensor by tensor, and transformers' processing of "
                            f"this architecture's tensor {tensor.name} needs the whole model; it is not supported")
        return torch.from_numpy(np.ascontiguousarray(processed.weights, dtype=np.float32))

    def _bytes(self, tensor: TensorInfo) -> np.ndarray:
        try:
            return tensor.read()
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read {self.path}: {error}") from None

    def embedding(self, name: str, dtype: torch.dtype, old: nn.Module) -> nn.Module | None:
        """The table's own blocks: Q8_0 as `BlockInt8Embedding`, any other quantized type memory-mapped
        (`GGUFRowsEmbedding`); None for a float table (dense)."""
        tensor = self.tensor(name)
        if tensor.type_name in FLOAT_TYPES:
            return None
        form = self.form(name)
        padding, scale = getattr(old, "padding_idx", None), _embed_scale(old)
        if isinstance(form, GGUFBlocks) and form.kernel_kind == 8:
            return BlockInt8Embedding(form.exact(), dtype, padding, scale)
        if self.order(tensor) is not KEEPS_ROWS:
            return None  # an embedding the processor changes: dense
        return GGUFRowsEmbedding(tensor, dtype, padding, scale)

    def release(self) -> None:
        self._read.clear()
        return_freed_memory()


class GGUFRowsEmbedding(QuantizedEmbedding):
    """An embedding table of any GGUF type, left in the file: a lookup reads and dequantizes only its rows (with the
    gguf package's own dequantization, so exactly what transformers' loader computes for them)."""

    def __init__(self, tensor: TensorInfo, dtype: torch.dtype, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None):
        super().__init__(tensor.rows, tensor.columns, dtype, padding_idx, embed_scale)
        self.type_name = tensor.type_name
        self.kind = f"{tensor.type_name} embedding"
        # copy-on-write mapping: writable for torch, shared with the page cache, read only where looked up
        mapped = np.memmap(tensor.path, dtype=np.uint8, mode="c", offset=tensor.offset, shape=(tensor.nbytes,))
        self.table = torch.from_numpy(mapped).view(tensor.rows, -1)

    def rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1).cpu()
        return dequantized(self.table[flat].numpy(), self.type_name).reshape(*input_ids.shape, self.embedding_dim)

    def stored_tensors(self) -> list:
        return [self.table]

    def __deepcopy__(self, memo):  # a copy of the model shares the mapped file (it is never written)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.type_name} blocks in the file"


def load_gguf(gguf_path: Path, folder: Path, header: GGUFHeader, choice, device, fuse: bool = True,
              progress=None):
    """The model of a GGUF file with `choice` (weight_choice.WeightChoice) on `device`, its tokenizer and the weights
    report, reading the weights from the file (see the module docstring) and the config and tokenizer from the
    converted metadata in `folder` (gguf_cache.cached_gguf_dir)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig


    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model = empty_model(config)
    source = GGUFWeights(header, gguf_names(folder), tensor_processor(
        header.strings.get("general.architecture", ""), config))
    report = _fill(model, source, gguf_path, folder, choice, fuse, progress)
    model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    if not d3_record.recorded(folder):  # what a later start needs to skip transformers
        d3_record.write(folder, model, tokenizer, header, source.names, source.processor)
    return model.to(device).eval(), tokenizer, report


def load_gguf_own(gguf_path: Path, folder: Path, header: GGUFHeader, choice, progress=None):
    """`load_gguf` on the CPU without importing transformers: d3's own model, tokenizer and config (d3_model.py,
    d3_tokenizer.py) from the start a transformers load recorded in `folder` (d3_record.py). None where there is
    no such record or d3's own model does not hold exactly the file's tensors (then `load_gguf` runs)."""
    record = d3_record.read(folder)
    if record is None or "unsupported" in record:
        return None
    processor = d3_record.RecordedProcessor(record)
    config = D3Config(json.loads((folder / "config.json").read_text()))
    if not processor.runs_every_tensor():  # a tensor transformers does more to than reorder its rows
        return None
    model = D3ForCausalLM.empty(config, torch.tensor(record["inv_freq"], dtype=torch.float32),
                                record["attention_scaling"])
    names = gguf_names(folder)
    in_file = set(names.values())
    in_model = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if in_file - in_model or in_model - in_file - {"lm_head.weight"}:
        return None  # a tensor one of them lacks: transformers' model decides what it means
    report = _fill(model, GGUFWeights(header, names, processor), gguf_path, folder, choice, True, progress)
    model.generation_config = SimpleNamespace(**json.loads((folder / "generation_config.json").read_text()))
    facts = record["tokenizer"]
    return model.eval(), D3Tokenizer(facts["backend"], facts), report


def _fill(model, source: GGUFWeights, gguf_path: Path, folder: Path, choice, fuse: bool, progress=None):
    """streamed.fill_model from the file, through the tile cache where quantized weights run on d3's kernels:
    nothing half-written stays in the cache when it fails."""
    if choice.quantized and tile_cache.enabled() and kernels.available():
        source.tile_cache = tile_cache.TileCache(folder, Path(gguf_path), *kernels.layout())
    try:
        report = fill_model(model, source, choice, fuse, what=str(gguf_path), progress=progress)
    except BaseException:
        if source.tile_cache is not None:
            source.tile_cache.abandon()
        raise
    if source.tile_cache is not None and (line := source.tile_cache.publish()):
        print(f"d3: {line}", file=sys.stderr)
    return report
