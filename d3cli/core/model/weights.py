"""Putting a weight choice (weight_choice.py) into a model: each linear layer of the decoder and the LM head
becomes its kind's module, built from the exact block form where the weight source has one, one decoder layer at a
time; the embedding table keeps its blocks where the weights are quantized.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from d3cli import kernels
from d3cli.core.model import fused_layers
from d3cli.core.model.embeddings import BlockInt8Embedding, QuantizedEmbedding
from d3cli.core.model.gguf_tiles import CENTRED_TYPES, GGUFBlocks, pack_joined
from d3cli.core.model.model_facts import find_decoder_layers
from d3cli.core.model.quantized import (
    GROUP_SIZE,
    AffineInt4,
    BlockInt8,
    BlockInt8Linear,
    Int4Linear,
    Int8Linear,
    StoredLinear,
    TiledWeights,
    fits_int4,
    fits_int8,
    quantize_int4,
    quantize_int8,
    tensor_bytes,
)
from d3cli.core.model.weight_choice import (
    FILE_KIND,
    KERNEL_KINDS,
    QUANTIZED_KINDS,
    STORED_KINDS,
    WeightChoice,
    WeightsReport,
    _nearest,
    dtype_name,
)


def head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is head), None)


def embedding_name(model: nn.Module) -> str | None:
    embedding = model.get_input_embeddings()
    return next((name for name, module in model.named_modules() if module is embedding), None)


class ModelWeights:
    """The weight source of a model whose weights are already loaded: exact block forms by weight name where a GGUF
    cache gave them, else each module's own weight. (gguf_weights.GGUFWeights reads them from a GGUF file instead.)"""

    tile_cache = None  # tile_cache.TileCache of a GGUF file's packed tiles, where kept

    def __init__(self, forms: Mapping[str, object] | None = None, types: Mapping[str, str] | None = None):
        self.forms, self.types = dict(forms or {}), dict(types or {})

    def form(self, name: str):
        """The exact block form of the weight `name`, or None."""
        return self.forms.get(name)

    def values(self, name: str, module: nn.Module | None = None) -> torch.Tensor:
        """The weight's values in float: its exact form dequantized, else the module's own weight."""
        form = self.forms.get(name)
        return form.dequantize() if form is not None else module.weight.detach()

    def row_slices(self, name: str, module: nn.Module | None = None):
        """The weight's values (as `values`) in slices of rows, for a re-quantization that needs no copy of the
        whole weight in float: here one slice."""
        yield self.values(name, module)

    def tie(self, head: str, embedding: str) -> None:
        """The LM head's weight `head` is the embedding table's `embedding`."""
        for known in (self.forms, self.types):
            if embedding in known:
                known[head] = known[embedding]

    def embedding(self, name: str, dtype: torch.dtype, old: nn.Module) -> nn.Module | None:
        """A quantized embedding module for the table `name` (its Q8_0 blocks), or None to keep a dense table."""
        table = self.forms.get(name)
        if isinstance(table, BlockInt8):
            return BlockInt8Embedding(table, dtype, getattr(old, "padding_idx", None), _embed_scale(old))
        return None

    def release(self) -> None:
        """Forget what was read for the modules built so far (a file-backed source frees it)."""


def _embed_scale(embedding: nn.Module) -> torch.Tensor | None:
    """The factor a scaled embedding (Gemma's) multiplies its rows by, or None."""
    scale = getattr(embedding, "embed_scale", None)
    return scale.detach().float().clone() if isinstance(scale, torch.Tensor) else None


@dataclass
class _Builder:
    """Builds the weight modules of one model for one choice, counting what it made."""

    choice: WeightChoice
    source: ModelWeights
    modules: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    groups: Counter = field(default_factory=Counter)  # int4 group size -> linear layers

    def kind(self, name: str, linear: nn.Linear, is_head: bool = False) -> str:
        """The stored kind of one linear layer: the choice's, the nearest of its GGUF type (auto on a file: int5
        and int6 only where d3's kernels run the file's blocks, else int8), int8 for the LM head of int4, dense
        where the kernels cannot take its shape."""
        choice = self.choice
        if not choice.quantized:
            return choice.kind
        if choice.kind == FILE_KIND:
            gguf_type = self.source.types.get(f"{name}.weight")
            kind = _nearest(gguf_type) if gguf_type else "float"
            if kind == "float":
                return dtype_name(choice.dtype)
            if kind in STORED_KINDS and not (kernels.available() and isinstance(self.source.form(f"{name}.weight"),
                                                                                 GGUFBlocks)):
                kind = "int8"
        else:
            kind = "int8" if is_head else choice.kind
        if kind == "int4" and not fits_int4(linear.in_features, self.group_size if self.source.form(
                f"{name}.weight") is None else GROUP_SIZE):
            kind = "int8"
        if kind == "int8" and not fits_int8(linear.in_features):
            return dtype_name(choice.dtype)
        return kind

    @property
    def group_size(self) -> int:
        return self.choice.group_size if self.choice.kind == "int4" else GROUP_SIZE

    def values(self, name: str, form, linear: nn.Linear) -> torch.Tensor:
        return form.dequantize() if form is not None else self.source.values(f"{name}.weight", linear)

    def quantized(self, name: str, form, linear: nn.Linear, quantize):
        """`quantize` (quantize_int8, or quantize_int4 with its group) of the weight's values, slice of rows by
        slice of rows where the source reads them so (each quantizes rows alone), joined."""
        if form is not None:
            return quantize(form.dequantize())
        parts = [quantize(rows) for rows in self.source.row_slices(f"{name}.weight", linear)]
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], AffineInt4):
            return AffineInt4(*(torch.cat(tensors) for tensors in zip(*((p.q, p.scale, p.offset) for p in parts))))
        return tuple(torch.cat(tensors) for tensors in zip(*parts))

    def build(self, names: Sequence[str], linears: Sequence[nn.Linear], kind: str) -> nn.Module:
        """One module computing the linear layers `linears` (named `names`), their outputs side by side."""
        forms = [self.source.form(f"{name}.weight") for name in names]
        packed = self.packed(forms, kind, names)
        if kind in STORED_KINDS and packed is None:  # stacked rows that are not whole tiles: int8 per channel
            kind = "int8"
        for name, form in zip(names, forms):
            self.modules[kind] += 1
            self.sources[_source(kind, form, self.source.types.get(f"{name}.weight"))] += 1
        bias = _joint_bias(linears)
        if packed is not None:  # a GGUF file's blocks straight into d3's tiles
            if kind == "int4":
                self.groups[GROUP_SIZE] += len(forms)
                return Int4Linear(None, bias, self.choice.dtype, packed=packed)
            if kind in STORED_KINDS:
                return StoredLinear(packed, bias, kind)
            return BlockInt8Linear(None, bias, self.choice.dtype, packed=packed)
        forms = [form.exact() if isinstance(form, GGUFBlocks) else form for form in forms]
        if kind == "int4":  # a GGUF file's 4-bit blocks as they are (groups of 32); float weights in groups
            group = GROUP_SIZE if any(isinstance(form, AffineInt4) for form in forms) else self.group_size
            parts = [form if isinstance(form, AffineInt4) else self.quantized(
                name, form, linear, lambda values, group=group: quantize_int4(values, group))
                     for name, form, linear in zip(names, forms, linears)]
            self.groups[group] += len(parts)
            return Int4Linear(AffineInt4(*(torch.cat(tensors) for tensors in zip(
                *((part.q, part.scale, part.offset) for part in parts)))), bias, self.choice.dtype)
        if kind == "int8" and all(isinstance(form, BlockInt8) for form in forms):  # Q8_0 blocks as they are
            return BlockInt8Linear(BlockInt8(torch.cat([form.q for form in forms]),
                                             torch.cat([form.scale for form in forms])), bias, self.choice.dtype)
        if kind == "int8":
            parts = [self.quantized(name, form, linear, quantize_int8) for name, form, linear in
                     zip(names, forms, linears)]  # per output channel: each part's rows alone
            q, scale = (torch.cat(tensors) for tensors in zip(*parts))
            return Int8Linear(q, scale, bias, self.choice.dtype)
        dtype = getattr(torch, kind)
        if len(linears) == 1 and forms[0] is None and linears[0].weight.device.type != "meta":
            return linears[0]
        values = torch.cat([self.values(name, form, linear).to(dtype)
                            for name, form, linear in zip(names, forms, linears)])
        joint = nn.Linear(values.shape[1], values.shape[0], bias=bias is not None, device="meta")
        joint.weight = nn.Parameter(values, requires_grad=False)
        if bias is not None:
            joint.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return joint

    def packed(self, forms: Sequence, kind: str, names: Sequence[str]):
        """The forms as one gguf_tiles.PackedTiles when every one is a GGUF file's blocks of `kind` and d3's kernels
        run (parts stack by whole tiles), else None: mapped from the source's tile cache where it holds them."""
        kernel_kinds = KERNEL_KINDS.get(kind, ())
        if not forms or not all(isinstance(form, GGUFBlocks) and form.kernel_kind in kernel_kinds for form in forms):
            return None
        if len({form.kernel_kind for form in forms}) > 1:
            return None
        if not kernels.available():
            return None
        tile_rows, unsigned = kernels.layout()
        if any(form.rows % tile_rows for form in forms[:-1]):
            return None
        cache, key = self.source.tile_cache, "|".join(names)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return cached
        packed = pack_joined(list(forms), tile_rows, unsigned, cache.allocate if cache is not None else None)
        if cache is not None:
            cache.keep(key, packed)
        return packed

    def build_runs(self, names: Sequence[str], linears: Sequence[nn.Linear]) -> list[nn.Module]:
        """Modules for consecutive linear layers: neighbours of the same stored kind share one module."""
        runs: list[tuple[tuple[str, bool], list[int]]] = []
        for index, (name, linear) in enumerate(zip(names, linears)):
            kind = self.kind(name, linear)  # Q8_0 blocks and per-channel int8 are different modules, and so are
            form = self.source.form(f"{name}.weight")  # the tiles of different GGUF types (Q4_0 beside Q4_K), and
            # centred types beside types with offsets (a stack would store −8d offsets the file does not have)
            key = (kind, kind == "int8" and _is_int8_blocks(form),
                   (form.kernel_kind, form.type_name in CENTRED_TYPES)
                   if isinstance(form, GGUFBlocks) and kernels.available() else None)
            if runs and runs[-1][0] == key:
                runs[-1][1].append(index)
            else:
                runs.append((key, [index]))
        return [self.build([names[i] for i in members], [linears[i] for i in members], key[0])
                for key, members in runs]


def _is_int8_blocks(form) -> bool:
    return isinstance(form, BlockInt8) or isinstance(form, GGUFBlocks) and form.kernel_kind == 8


def _is_int4_blocks(form) -> bool:
    return isinstance(form, AffineInt4) or isinstance(form, GGUFBlocks) and form.kernel_kind in KERNEL_KINDS["int4"]


def _joint_bias(linears: Sequence[nn.Linear]) -> torch.Tensor | None:
    if all(linear.bias is None for linear in linears):
        return None
    return torch.cat([linear.bias.detach().float() if linear.bias is not None
                      else torch.zeros(linear.out_features) for linear in linears])


def apply_weights(model: nn.Module, choice: WeightChoice, forms: Mapping[str, object] | None = None,
                  gguf_types: Mapping[str, str] | None = None, fuse: bool = True,
                  source: ModelWeights | None = None, progress=None) -> WeightsReport:
    """Put `choice` into `model` (on its device, its other parameters already in `choice.dtype`) and return what
    ran. Each linear layer of the decoder and the LM head becomes the kind's module, built from its exact block form
    where the weight source has one, else from its float values; dense kinds dequantize the forms into float
    weights. The source is `source` (a GGUF file read as the modules are built: the model's own linear weights may
    then be empty), else the model's own weights with `forms` and `gguf_types` by weight name. A quantized
    embedding table keeps its blocks when the weights are quantized. With `fuse`, each decoder layer that
    fused_layers supports becomes a `FusedDecoderLayer` (query/key/value and gate/up projections each one
    module). Layers are built one at a time, and what the source read for one is released before the next;
    `progress(done, total)` is called after each."""
    source = source if source is not None else ModelWeights(forms, gguf_types)
    builder = _Builder(choice, source)
    head, embedding = head_name(model), embedding_name(model)
    tied = bool(head and embedding and model.get_submodule(head).weight is model.get_submodule(embedding).weight)
    if tied:  # a tied LM head is the embedding table's weight
        source.tie(f"{head}.weight", f"{embedding}.weight")
    layers = find_decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    for index, layer in enumerate(layers):
        base = f"{prefix}.{index}"
        if fuse and fused_layers.supports(layer):
            def runs(relative, base=base, layer=layer):
                return builder.build_runs([f"{base}.{name}" for name in relative],
                                          [layer.get_submodule(name) for name in relative])
            layers[index] = fused_layers.FusedDecoderLayer(
                layer, runs(fused_layers.QKV), runs(("self_attn.o_proj",))[0], runs(fused_layers.GATE_UP),
                runs(("mlp.down_proj",))[0])
        else:
            for name, module in list(layer.named_modules()):
                if isinstance(module, nn.Linear):
                    full = f"{base}.{name}"
                    layer.set_submodule(name, builder.build([full], [module], builder.kind(full, module)))
        source.release()
        if progress is not None:
            progress(index + 1, len(layers))
    head_kind = None
    if head is not None:
        linear = model.get_submodule(head)
        kind = head_kind = builder.kind(head, linear, is_head=True)
        if tied and not choice.quantized:
            builder.modules[kind] += 1  # dense and tied: the head is the embedding table, set below
            builder.sources[_source(kind, source.form(f"{head}.weight"), source.types.get(f"{head}.weight"))] += 1
        else:
            model.set_submodule(head, builder.build([head], [linear], kind))
        source.release()
    if embedding is not None:
        old = model.get_submodule(embedding)
        table = source.embedding(f"{embedding}.weight", choice.dtype, old) if choice.quantized else None
        if table is not None:
            model.set_submodule(embedding, table)
            builder.modules[table.kind] += 1
        elif source.form(f"{embedding}.weight") is not None or old.weight.device.type == "meta":
            _set_dense(old, source.values(f"{embedding}.weight", old), choice.dtype)
            if tied and not choice.quantized:
                model.get_submodule(head).weight = old.weight
        source.release()
    _check_no_empty_parameters(model)
    group = builder.groups.most_common(1)[0][0] if builder.groups else None
    return _report(model, choice, builder.modules, builder.sources, head_kind, group)


def _set_dense(module: nn.Module, values: torch.Tensor, dtype: torch.dtype) -> None:
    module.weight = nn.Parameter(values.to(dtype), requires_grad=False)


def _source(kind: str, form, gguf_type: str | None) -> str:
    if (kind == "int4" and _is_int4_blocks(form)) or (kind == "int8" and _is_int8_blocks(form)) or (
            kind in STORED_KINDS and isinstance(form, GGUFBlocks)):
        return f"gguf {gguf_type} as it is"
    if gguf_type and kind in QUANTIZED_KINDS:
        return f"gguf {gguf_type} re-quantized to {kind}"
    if gguf_type:
        return f"gguf {gguf_type} dequantized"
    return f"quantized to {kind} on load" if kind in QUANTIZED_KINDS else "dense"


def _check_no_empty_parameters(model: nn.Module) -> None:
    empty = [name for name, parameter in model.named_parameters() if parameter.device.type == "meta"]
    if empty:
        raise RuntimeError(f"weights never loaded: {', '.join(empty[:5])}")


def _report(model: nn.Module, choice: WeightChoice, modules: Counter, sources: Counter,
            head_kind: str | None, group_size: int | None) -> WeightsReport:
    layers = find_decoder_layers(model)
    layer_bytes = tuple(module_weight_bytes(layer) for layer in layers)
    head = model.get_output_embeddings()
    head_bytes = module_weight_bytes(head) if head is not None else 0
    total = module_weight_bytes(model)
    kind = choice.kind
    if kind == FILE_KIND:  # named by what most decoder layers' linear weights are
        linear_kinds = Counter({name: count for name, count in modules.items() if not name.endswith(" embedding")})
        kind = linear_kinds.most_common(1)[0][0] if linear_kinds else dtype_name(choice.dtype)
    return WeightsReport(kind=kind, dtype=dtype_name(choice.dtype), modules=dict(modules), sources=dict(sources),
                         group_size=group_size, layer_bytes=layer_bytes,
                         head_bytes=head_bytes, other_bytes=max(0, total - sum(layer_bytes) - head_bytes),
                         why=choice.why, head_kind=head_kind, kernels=_kernels(model) if choice.quantized else None)


def _kernels(model: nn.Module) -> str | None:
    """Which kernels the model's quantized layers run on: d3's (and their instruction set) or torch's (and why)."""
    if any(isinstance(module, TiledWeights) for module in model.modules()):
        return kernels.description() if kernels.loaded() else "d3 kernels"
    if any(isinstance(module, (Int4Linear, Int8Linear, BlockInt8Linear)) for module in model.modules()):
        reason = kernels.load() or "turned off"
        return f"torch kernels ({reason})"
    return None


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights a module holds: parameters, buffers and quantized blocks, each tensor counted once."""
    seen, total = set(), 0
    for submodule in module.modules():
        tensors = list(submodule.parameters(recurse=False)) + list(submodule.buffers(recurse=False))
        if isinstance(submodule, QuantizedEmbedding):
            tensors += submodule.stored_tensors()
        for tensor in tensors:
            if tensor is not None and id(tensor) not in seen and tensor.device.type != "meta":
                seen.add(id(tensor))
                total += tensor_bytes(tensor)
    return total
