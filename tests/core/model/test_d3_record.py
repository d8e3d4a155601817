"""What a transformers start records for a lean one: made only for a model d3's own model runs, never used from
another transformers version or when broken, and the recorded processing of each tensor as transformers' own."""

import json

import numpy as np
import pytest
from gguf_files import Shape, write_tiny_gguf

from d3cli import kernels
from d3cli.core.model import d3_record, gguf_cache, loader
from d3cli.core.model.d3_model import D3ForCausalLM

pytestmark = pytest.mark.skipif(not kernels.available(), reason="d3's own model runs where d3's kernels do")


def test_a_family_d3s_model_does_not_build_is_recorded_as_such_and_loads_through_transformers(tmp_path):
    path = write_tiny_gguf(tmp_path / "gemma3.gguf", loader.embedded_gguf_path(), {}, shape=Shape(layers=2),
                           architecture="gemma3")
    loader.load(str(path), device="cpu")
    record = d3_record.read(gguf_cache.cached_gguf_dir(path))
    assert "model type" in record["unsupported"] or "sliding" in record["unsupported"]
    assert not isinstance(loader.load(str(path), device="cpu", lean=True).model, D3ForCausalLM)


def test_a_record_of_another_transformers_version_or_a_broken_one_is_not_used(tmp_path):
    path = write_tiny_gguf(tmp_path / "llama.gguf", loader.embedded_gguf_path(), {}, shape=Shape(layers=2))
    loader.load(str(path), device="cpu")
    folder = gguf_cache.cached_gguf_dir(path)
    record_file = folder / d3_record.RECORD_FILE
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "transformers": "0.0.1"}))
    assert d3_record.read(folder) is None and not d3_record.recorded(folder)
    assert not isinstance(loader.load(str(path), device="cpu", lean=True).model, D3ForCausalLM)
    assert d3_record.read(folder) is not None and d3_record.recorded(folder)  # that start recorded it again
    (folder / d3_record.TOKENIZER_FILE).unlink()
    assert d3_record.read(folder) is None
    record_file.write_text("{not json")
    assert d3_record.read(folder) is None


def test_the_recorded_processing_is_transformers_own(tmp_path):
    """Every tensor of a Llama file as transformers' tensor processor leaves it: q and k rows reordered, the rest
    kept, and the recorded processor gives the same arrays."""
    path = write_tiny_gguf(tmp_path / "llama.gguf", loader.embedded_gguf_path(), {}, shape=Shape(layers=2))
    loader.load(str(path), device="cpu")
    folder = gguf_cache.cached_gguf_dir(path)
    record = d3_record.read(folder)
    recorded = d3_record.RecordedProcessor(record)
    header = gguf_cache.read_header(path)
    names = gguf_cache.gguf_names(folder)
    from transformers import AutoConfig

    theirs = gguf_cache.tensor_processor("llama", AutoConfig.from_pretrained(str(folder)))
    assert recorded.runs_every_tensor()
    for tensor in header.tensors:
        if tensor.name not in names:
            continue
        values = np.arange(int(np.prod(tensor.shape)), dtype=np.float64).reshape(tensor.shape)
        expected = theirs.process(weights=values.copy(), name=tensor.name, tensor_key_mapping=names,
                                  parsed_parameters={"tensors": {}, "config": {}}).weights
        assert np.array_equal(recorded.process(values.copy(), tensor.name).weights, expected), tensor.name
