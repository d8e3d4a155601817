"""Whether a model fits (core/model/memory.py): the refusal before loading, with its numbers, and `auto`'s choice for a
float checkpoint on the CPU, each with the free memory the test sets."""

from __future__ import annotations

import pytest

from d3cli.base.errors import UserError
from d3cli.core.model import loader, memory


def test_a_model_larger_than_the_free_memory_is_refused_before_loading(tmp_path, monkeypatch):
    from gguf_files import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "model.gguf", loader.embedded_gguf_path(), {})
    monkeypatch.setattr(memory, "available_memory", lambda: 1_000_000)
    built = []
    monkeypatch.setattr(loader, "load_gguf", lambda *args, **kwargs: built.append(args))
    with pytest.raises(UserError, match=r"needs about [\d.]+ GiB in its own blocks, and this machine has 0.0 GiB free"):
        loader.load(str(gguf))
    with pytest.raises(UserError, match=r"as float32.*--weights int4"):
        loader.load(str(gguf), weights="float32")
    assert built == []


def test_auto_picks_the_first_kind_that_fits_the_free_memory(tiny_model_dir, monkeypatch):
    from d3cli.core.model.streamed import SafetensorsWeights, safetensors_files

    values = SafetensorsWeights(safetensors_files(tiny_model_dir)).numel()
    monkeypatch.setattr(memory, "available_memory", lambda: int(values * 4 / 0.8) + 1)
    assert loader.load(str(tiny_model_dir)).weights.kind == "float32"
    monkeypatch.setattr(memory, "available_memory", lambda: int(values * 2))
    chosen = loader.load(str(tiny_model_dir)).weights
    assert chosen.kind == "int8" and "float32 would take" in chosen.why
    monkeypatch.setattr(memory, "available_memory", lambda: int(values * 0.8))
    assert loader.load(str(tiny_model_dir)).weights.kind == "int4"
    monkeypatch.setattr(memory, "available_memory", lambda: int(values * 0.1))
    with pytest.raises(UserError, match=r"needs about [\d.]+ GiB as int4.* GiB free"):
        loader.load(str(tiny_model_dir))
