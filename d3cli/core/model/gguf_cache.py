"""What d3 derives from a GGUF file's header once: its config, tokenizer and tensor names, cached.

Transformers turns a GGUF file's metadata into a config and a tokenizer (about 9 s for the embedded model's 49k-token
vocabulary). d3 does that once per file header and caches the result in the user cache, keyed by a digest of the
header (metadata, tokenizer, tensor names, types and places) and the file's size:

    config.json, generation_config.json, the tokenizer's files
    d3-source.json   the file, its header digest, each tensor's Hugging Face name and GGUF type

The header itself (string metadata, each tensor's name, type, shape and place) is kept too, in
`gguf-headers/`, keyed by the file's path and checked against its size, modification time and inode: a warm start
reads it back instead of walking the file's 98 000 tokenizer strings and importing the gguf package (0.13 s of a
new process for the embedded model).

The weights are not cached: every load reads them from the GGUF file itself, tensor by tensor (gguf_weights.py), so
a 4 GB file is not copied again, and a loaded model takes about the file's size in memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from d3cli.base.errors import UserError
from d3cli.base.files import write_atomically
from d3cli.base.paths import cache_home, exclusive
from d3cli.core.model.gguf_blocks import GGUFHeader, TensorInfo, header_digest, read_gguf
from d3cli.core.model.streamed import empty_model, quiet_transformers

CACHE_FORMAT = 3  # 1: a float32 safetensors copy; 2: the weights' blocks copied (d3 before reading the file itself)
SOURCE_FILE = "d3-source.json"


HEADERS_FOLDER = "gguf-headers"


def read_header(gguf_path: Path) -> GGUFHeader:
    """The file's header (gguf_blocks.GGUFHeader), from d3's cache when this file was read before and has not
    changed since; a UserError names what is wrong with a file that is not a GGUF file, or is truncated or corrupt."""
    try:
        stat = os.stat(gguf_path)
    except OSError as error:
        raise UserError(f"cannot read {gguf_path}: {error.strerror or error}") from None
    remembered = _remembered_header(gguf_path, stat)
    if remembered is not None:
        return remembered
    try:
        header = read_gguf(gguf_path)
    except OSError as error:
        raise UserError(f"cannot read {gguf_path}: {error.strerror or error}") from None
    except (ValueError, struct.error, OverflowError, MemoryError) as error:
        raise UserError(f"cannot load GGUF file {gguf_path}: {_first_line(error)}") from None
    _remember_header(gguf_path, stat, header)
    return header


def _header_file(gguf_path: Path) -> Path:
    name = hashlib.sha256(str(Path(gguf_path).resolve()).encode()).hexdigest()[:24]
    return cache_home() / HEADERS_FOLDER / f"{name}.json"


def _file_identity(gguf_path: Path, stat: os.stat_result) -> dict:
    return {"file": str(Path(gguf_path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "inode": stat.st_ino, "format": 1}


def _remember_header(gguf_path: Path, stat: os.stat_result, header: GGUFHeader) -> None:
    """Keep the header for the next start; a cache that cannot be written only costs that start its parse."""
    tensors = [[tensor.name, tensor.type_name, tensor.rows, tensor.columns, list(tensor.shape), tensor.offset,
                tensor.nbytes, int(tensor.data.shape[1])] for tensor in header.tensors]
    record = {**_file_identity(gguf_path, stat), "strings": header.strings, "data_start": header.data_start,
              "tensors": tensors}
    with contextlib.suppress(UserError, OSError):
        write_atomically(_header_file(gguf_path), json.dumps(record), make_parents=True)


def _remembered_header(gguf_path: Path, stat: os.stat_result) -> GGUFHeader | None:
    """The kept header of this very file (same path, size, modification time and inode), else None."""
    try:
        record = json.loads(_header_file(gguf_path).read_text())
        if {key: record.get(key) for key in ("file", "size", "mtime_ns", "inode", "format")} != _file_identity(
                gguf_path, stat):
            return None
        contents = np.memmap(gguf_path, dtype=np.uint8, mode="r")
        tensors = [TensorInfo(name, type_name, rows, columns,
                              contents[offset:offset + nbytes].reshape(rows, row_bytes), tuple(shape),
                              str(gguf_path), offset, nbytes)
                   for name, type_name, rows, columns, shape, offset, nbytes, row_bytes in record["tensors"]]
        return GGUFHeader(dict(record["strings"]), tensors, int(record["data_start"]))
    except (OSError, ValueError, KeyError, TypeError):  # none kept, another format, or a damaged file: parse again
        return None


def cached_gguf_dir(gguf_path: Path, header=None) -> Path:
    """The cached metadata of a GGUF file, converting it first if a file with this header was never converted. A
    conversion writes into a staging folder renamed into place at the end: a crash or Ctrl-C leaves nothing
    half-written."""
    header = header if header is not None else read_header(gguf_path)
    key = header_digest(gguf_path, header)
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
        names, types = _convert_gguf(gguf_path, staging)
        (staging / SOURCE_FILE).write_text(json.dumps(
            {"gguf_file": str(gguf_path), "header_sha256": key, "format": CACHE_FORMAT, "names": names,
             "types": types}, indent=2) + "\n")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_types(folder: Path) -> dict[str, str]:
    """Each mapped tensor's GGUF type, by parameter name, as the conversion recorded it."""
    return json.loads((folder / SOURCE_FILE).read_text()).get("types", {})


def gguf_names(folder: Path) -> dict[str, str]:
    """Each GGUF tensor's parameter name (GGUF name -> Hugging Face name), as the conversion recorded it."""
    return json.loads((folder / SOURCE_FILE).read_text()).get("names", {})


def tensor_processor(architecture: str, config):
    """Transformers' tensor processor for a GGUF architecture (what it does to each tensor after dequantizing)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.get_text_config(decoder=True).to_dict())


def _convert_gguf(gguf_path: Path, out_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Read a GGUF file's metadata with transformers (no tensor is read); write the config, generation config and
    tokenizer. Returns each tensor's parameter name (GGUF name -> name) and its GGUF type by parameter name."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map


    quiet_transformers()
    folder, name = str(gguf_path.parent), gguf_path.name
    header = read_header(gguf_path)
    if sys.stderr.isatty():
        sys.stderr.write(f"d3: reading {name}'s tokenizer and config once (later runs load them in a moment)\n")
    with _each_gguf_part_parsed_once():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            model = empty_model(config)
            processor = tensor_processor(header.strings.get("general.architecture", ""), config)
            names = get_gguf_hf_weights_map(model, processor)
        except Exception as error:  # transformers raises many types for a bad or unsupported GGUF
            raise UserError(f"cannot load GGUF file {gguf_path}: {_first_line(error)}") from None
    present = {tensor.name: tensor.type_name for tensor in header.tensors}
    names = {gguf: hf for gguf, hf in names.items() if gguf in present}
    types = {hf: present[gguf] for gguf, hf in names.items()}
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return names, types


_gguf_patched = threading.Lock()


@contextlib.contextmanager
def _each_gguf_part_parsed_once():
    """Transformers parses the file's header three times (for the tokenizer, the config and the weights: 5 s each for
    the embedded model's 49k-entry vocabulary) and builds gguf's tensor-name map again for every module it walks
    (about 800 times, 13 s in all). Within a conversion each is made once: the readers are only read, and the map
    is a pure function of (architecture, layers). The embedded model's conversion: 28 s before, 9 s with."""
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
