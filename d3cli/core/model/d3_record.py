"""What transformers made of a GGUF model, recorded in its cache folder so that later starts need not import it.

A start through transformers (gguf_weights.load_gguf) writes, beside the converted config and tokenizer:

    d3-start.json       the transformers version; the rotary inverse frequencies and scaling its model computed;
                        for each GGUF tensor, what its tensor processor does to it ("keeps", a row order, or null:
                        more than a reorder); the tokenizer's special ids, chat template, template strings
    d3-tokenizer.json   the tokenizer's backend exactly as transformers set it up

It writes them only for a model d3's own model runs exactly (d3_model.py: a Llama-family config, full attention, a
static rope, no MLP bias) and only after checking, on probe texts and a probe conversation, that the recorded
tokenizer gives transformers' token ids and chat rendering. A later start of the same file with the same transformers
version builds d3's own model, tokenizer and config from the record (loader.py, `lean`); any other start goes
through transformers and records again. The files are written to a temporary name and renamed: a crash leaves none
half-written.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from d3cli.core.model.d3_model import FAMILIES, TRANSFORMERS_CLASSES
from d3cli.core.model.gguf_blocks import row_order
from d3cli.core.text.d3_tokenizer import D3Tokenizer

RECORD_FILE = "d3-start.json"
TOKENIZER_FILE = "d3-tokenizer.json"
FORMAT = 1
STATIC_ROPES = ("default", "linear", "llama3", "yarn")  # rope types whose tables do not change with the length
PROBE_TEXTS = ("Hello, world!", "  Two spaces, a tab\tand a newline\n.", "Ünïcödé — 東京 🙂", "x=1; y = x**2",
               "<|im_start|> and </s> as text")
PROBE_CONVERSATION = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again, in French."})


def transformers_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def unsupported(config) -> str | None:
    """Why d3's own model cannot stand in for this config's transformers model, or None."""
    text = config.get_text_config(decoder=True)
    family = getattr(text, "model_type", None)
    if family not in FAMILIES:
        return f"model type {family!r}"
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        return "sliding-window layers"
    if not layer_types and getattr(text, "sliding_window", None) is not None:
        return "a sliding window"
    rope = (getattr(text, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPES:
        return f"rope type {rope!r}"
    if getattr(text, "hidden_act", "silu") != "silu" or getattr(text, "mlp_bias", False):
        return "its MLP"
    return None


def write(folder: Path, model, tokenizer, header, names: dict[str, str], processor) -> bool:
    """Record this model's start in `folder` (see the module docstring), where d3's own model can run it. Returns
    whether it did; never raises for a model it cannot record or a folder it cannot write."""
    why = unsupported(model.config)
    if why is None and type(model).__name__ != TRANSFORMERS_CLASSES.get(model.config.model_type):
        why = f"model class {type(model).__name__}"
    if why is None and not _tokenizer_checks(tokenizer):
        why = "its tokenizer (the tokenizers library alone gives other ids or another chat rendering)"
    if why is not None:  # recorded too, so that later starts do not check again
        try:
            _write_atomic(folder / RECORD_FILE, json.dumps({"format": FORMAT, "transformers": transformers_version(),
                                                            "unsupported": why}))
        except OSError:
            pass
        return False
    rotary = model.model.rotary_emb
    tensors, orders = {}, []
    for tensor in header.tensors:
        if tensor.name not in names:
            continue
        if len(tensor.shape) == 2:
            order = row_order(processor, tensor.name, tensor.rows, names)
        else:
            order = _keeps_values(processor, tensor, names)
        if order is None or isinstance(order, str):
            tensors[tensor.name] = order
        else:
            tensors[tensor.name] = len(orders)
            orders.append(order.tolist())
    record = {
        "format": FORMAT,
        "transformers": transformers_version(),
        "model_class": type(model).__name__,
        "inv_freq": [float(value) for value in rotary.inv_freq.float().tolist()],
        "attention_scaling": float(rotary.attention_scaling),
        "tensors": tensors,
        "orders": orders,
        "tokenizer": _tokenizer_facts(tokenizer),
    }
    try:
        _write_atomic(folder / TOKENIZER_FILE, tokenizer.backend_tokenizer.to_str())
        _write_atomic(folder / RECORD_FILE, json.dumps(record))
    except OSError:
        return False
    return True


def recorded(folder: Path) -> bool:
    """Whether this transformers version recorded the folder's start already (supported or not): its small JSON alone,
    not the tokenizer behind it."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == FORMAT and \
        record.get("transformers") == transformers_version()


def read(folder: Path) -> dict | None:
    """The folder's record, when there is one made by this transformers version; else None. A record of a model
    d3's own model cannot run says why under "unsupported"."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
        if record.get("format") != FORMAT or record.get("transformers") != transformers_version():
            return None
        if "unsupported" not in record:
            record["tokenizer"]["backend"] = (folder / TOKENIZER_FILE).read_text()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return record


class RecordedProcessor:
    """transformers' tensor processor for this file as recorded: each tensor kept or its rows reordered."""

    def __init__(self, record: dict):
        self.tensors, self.orders = record["tensors"], [np.asarray(order) for order in record["orders"]]

    def runs_every_tensor(self) -> bool:
        return all(verdict is not None for verdict in self.tensors.values())

    def process(self, weights, name: str, **_):
        verdict = self.tensors.get(name)
        if verdict is None:
            raise ValueError(f"no recorded processing of tensor {name}")
        if verdict != "keeps":
            weights = weights[self.orders[verdict]]
        return SimpleNamespace(name=name, weights=weights)


def _keeps_values(processor, tensor, names) -> str | None:
    numbers = np.arange(int(np.prod(tensor.shape)), dtype=np.float64).reshape(tensor.shape)
    try:
        processed = processor.process(weights=numbers.copy(), name=tensor.name, tensor_key_mapping=names,
                                      parsed_parameters={"tensors": {}, "config": {}})
    except Exception:  # a processor that needs the real values
        return None
    same = processed.name == tensor.name and np.shape(processed.weights) == numbers.shape and np.array_equal(
        processed.weights, numbers)
    return "keeps" if same else None


def _tokenizer_facts(tokenizer) -> dict:
    special = {}
    for key, value in dict(getattr(tokenizer, "special_tokens_map", {}) or {}).items():
        special[key] = [str(item) for item in value] if isinstance(value, (list, tuple)) else str(value)
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None) or None,
        "special_tokens_map": special,
        "clean_up_tokenization_spaces": bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
    }


def _tokenizer_checks(tokenizer) -> bool:
    """Whether d3's own tokenizer built from this one gives its token ids, texts and chat rendering on the probes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        own = D3Tokenizer(backend.to_str(), _tokenizer_facts(tokenizer))
        for text in PROBE_TEXTS:
            for special in (True, False):
                ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
                if own.encode(text, special) != ids:
                    return False
            for skip in (True, False):
                if own.decode(ids, skip_special_tokens=skip) != tokenizer.decode(ids, skip_special_tokens=skip):
                    return False
        if own.chat_template:
            for messages in (list(PROBE_CONVERSATION), list(PROBE_CONVERSATION[1:2])):
                for generation in (True, False):
                    try:
                        theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=generation,
                                                               tokenize=False)
                    except Exception:  # a template that refuses the probe (a system message, say)
                        theirs = None
                    if theirs is not None and own.render_chat(messages, generation) != theirs:
                        return False
    except Exception:  # anything the backend or the template refuses: no record
        return False
    return True


def _write_atomic(path: Path, text: str) -> None:
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
