"""A GGUF file's cached copy: converted once, loaded in about a second, in any weight kind.

Transformers reads a GGUF file by dequantizing every tensor (about 9 s for the embedded model). d3 does that once per
file (keyed by its sha256) and caches what the file holds, as safetensors in the user cache:

    blocks.safetensors   each quantized weight in its exact block form (gguf_blocks.py): `NAME.int4_nibbles`,
                         `NAME.int4_scale`, `NAME.int4_offset` (Q4_0/Q4_1/Q4_K), `NAME.q8_0`, `NAME.q8_0_scale`
    dense.safetensors    every other tensor in float32 (norms, and weights of types without an exact form)
    config.json, generation_config.json, the tokenizer's files, d3-source.json (file, sha256, each tensor's type)

The cached copy is 112 MB for the embedded model (its float32 copy was 538 MB), and any weight kind is built from
it: int4 straight from the blocks, dense float weights by dequantizing them (exactly the values transformers gives).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from d3cli.core.errors import UserError
from d3cli.core.paths import cache_home, exclusive

CACHE_FORMAT = 2  # 1: a float32 safetensors copy (d3 before quantized execution)
SOURCE_FILE = "d3-source.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_gguf_dir(gguf_path: Path) -> Path:
    """The cached copy of a GGUF file, converting it first if this exact file was never converted. A conversion
    writes into a staging folder renamed into place at the end: a crash or Ctrl-C leaves no half-written copy."""
    try:
        key = file_sha256(gguf_path)
    except OSError as error:
        raise UserError(f"cannot read {gguf_path}: {error.strerror or error}") from None
    target = cache_home() / "models" / f"{gguf_path.stem}-{key[:16]}-v{CACHE_FORMAT}"
    if (target / SOURCE_FILE).is_file():
        return target
    with exclusive(target.name):  # processes started together convert it once
        if not (target / SOURCE_FILE).is_file():
            _convert_into(gguf_path, key, target)
    return target


def _convert_into(gguf_path: Path, key: str, target: Path) -> None:
    """Convert into a staging folder beside `target`, renamed to `target` once complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        types = _convert_gguf(gguf_path, staging)
        (staging / SOURCE_FILE).write_text(json.dumps(
            {"gguf_file": str(gguf_path), "sha256": key, "format": CACHE_FORMAT, "types": types or {}},
            indent=2) + "\n")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_types(folder: Path) -> dict[str, str]:
    """Each mapped tensor's GGUF type, by parameter name, as the conversion recorded it."""
    return json.loads((folder / SOURCE_FILE).read_text()).get("types", {})


def _convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, str]:
    """Read a GGUF file with transformers (dequantized) and its blocks with gguf_blocks; write the cached copy.
    Returns each tensor's GGUF type by parameter name."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from d3cli.core.gguf_blocks import read_block_forms
    from d3cli.core.quantized import AffineInt4

    folder, name = str(gguf_path.parent), gguf_path.name
    with open(gguf_path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if sys.stderr.isatty():
        sys.stderr.write(f"d3: converting {name} once to a cached copy (later runs load it in about a second)\n")
    with _each_gguf_part_parsed_once():
        try:
            with _conversion_progress_only_on_a_terminal():
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except Exception as error:  # transformers raises many types for a bad or unsupported GGUF
            raise UserError(f"cannot load GGUF file {gguf_path}: {_first_line(error)}") from None
        forms, types = read_block_forms(gguf_path, model)
    blocks = {}
    for weight, form in forms.items():
        if isinstance(form, AffineInt4):
            blocks.update({f"{weight}.int4_nibbles": form.nibbles(), f"{weight}.int4_scale": form.scale,
                           f"{weight}.int4_offset": form.offset})
        else:
            blocks.update({f"{weight}.q8_0": form.q, f"{weight}.q8_0_scale": form.scale})
    state = model.state_dict()
    dense, seen = {}, {state[weight].data_ptr() for weight in forms}
    for weight, tensor in state.items():
        if weight in forms or tensor.data_ptr() in seen:  # a tied head is its embedding, loaded once
            continue
        seen.add(tensor.data_ptr())
        dense[weight] = tensor.detach().contiguous()
    save_file({key: value.contiguous() for key, value in blocks.items()}, str(out_dir / "blocks.safetensors"))
    save_file(dense, str(out_dir / "dense.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return types


def read_block_files(folder: Path) -> tuple[dict[str, object], dict]:
    """The cached copy's block forms by weight name, and its dense tensors by name."""
    from safetensors.torch import load_file

    from d3cli.core.quantized import AffineInt4, BlockInt8

    stored = load_file(str(folder / "blocks.safetensors"))
    forms = {}
    for key in stored:
        if key.endswith(".int4_nibbles"):
            weight = key[: -len(".int4_nibbles")]
            forms[weight] = AffineInt4.from_nibbles(stored[key], stored[f"{weight}.int4_scale"],
                                                    stored[f"{weight}.int4_offset"])
        elif key.endswith(".q8_0"):
            weight = key[: -len(".q8_0")]
            forms[weight] = BlockInt8(stored[key], stored[f"{weight}.q8_0_scale"])
    return forms, load_file(str(folder / "dense.safetensors"))


def load_cached(folder: Path, choice, device, fuse: bool = True):
    """The model of a cached copy with `choice` (weights.WeightChoice) on `device`, its tokenizer, and the
    weights report: the model is built without weights, the dense tensors loaded, then each weight module made
    from its block form (`fuse`: in fused decoder layers where supported)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from d3cli.core.weights import apply_weights

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    forms, dense = read_block_files(folder)
    model.load_state_dict(dense, strict=False, assign=True)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and config.get_text_config(decoder=True).tie_word_embeddings:
        head.weight = embedding.weight
    model.to(choice.dtype)
    report = apply_weights(model, choice, forms, gguf_types(folder), fuse=fuse)
    model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    return model.to(device).eval(), tokenizer, report


_gguf_patched = threading.Lock()


@contextlib.contextmanager
def _each_gguf_part_parsed_once():
    """Transformers parses the file's header three times (for the tokenizer, the config and the weights: 5 s each for
    the embedded model's 49k-entry vocabulary) and builds gguf's tensor-name map again for every module it walks
    (about 800 times, 13 s in all). Within a conversion each is made once: the readers are only read, and the map
    is a pure function of (architecture, layers). The embedded model's conversion: 28 s before, 9 s with."""
    import functools

    import gguf

    readers = {}

    with _gguf_patched:  # the patch is the gguf module's: conversions in two threads take turns
        saved_reader, saved_name_map = gguf.GGUFReader, gguf.get_tensor_name_map

        def shared_reader(path, mode="r"):
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = saved_reader(path, mode)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(saved_name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = saved_reader, saved_name_map


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
