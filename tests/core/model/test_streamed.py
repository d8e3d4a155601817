"""An empty model filled from a weight source one tensor at a time: safetensors shards found and read (a slice of
rows at a time), tied LM heads, and the one-line errors of files that do not fit the config."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from d3cli.base.errors import UserError
from d3cli.core.model import loader
from d3cli.core.model.streamed import SafetensorsWeights, empty_model, fill_model, load_folder, safetensors_files
from d3cli.core.model.weight_choice import WeightChoice


def tiny_logits(model):
    import torch

    with torch.inference_mode():
        return model(torch.tensor([[1, 504, 314, 260, 1694, 23, 282]])).logits.float()


def test_a_safetensors_folder_is_filled_tensor_by_tensor_as_transformers_loads_it(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from d3cli.core.model import streamed, weights

    filled = []
    original = streamed.fill_model
    monkeypatch.setattr(streamed, "fill_model", lambda *args, **kwargs: filled.append(1) or original(*args, **kwargs))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dense = loader.load(str(tiny_model_dir))
    assert filled == [1] and dense.weights.kind == "float32"
    assert torch.equal(tiny_logits(dense.model), tiny_logits(reference))
    int8 = loader.load(str(tiny_model_dir), weights="int8")  # re-quantized a slice of rows at a time
    weights.apply_weights(reference, int8_choice(), fuse=True)  # the whole float model quantized at once
    assert torch.equal(tiny_logits(int8.model), tiny_logits(reference))


def int8_choice():
    from d3cli.core.model.weight_choice import WeightChoice, quantized_dtype

    return WeightChoice("int8", quantized_dtype())


def tiny_tensors(tiny_model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


def test_the_shards_an_index_names_else_every_safetensors_file(tmp_path):
    assert safetensors_files(tmp_path) is None
    for name in ("b.safetensors", "a.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert safetensors_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "part-2.safetensors", "y": "part-1.safetensors",
                                                "z": "part-2.safetensors"}}))
    assert safetensors_files(tmp_path) == [tmp_path / "part-1.safetensors", tmp_path / "part-2.safetensors"]
    index.write_text("{not json")
    assert safetensors_files(tmp_path) is None  # transformers' own loader then says what is wrong


def test_shards_are_read_as_float32_whole_or_a_slice_of_rows_at_a_time(tmp_path, monkeypatch):
    first = {"a": torch.arange(12, dtype=torch.float16).reshape(4, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    second = {"c": torch.arange(10 * 2, dtype=torch.float32).reshape(10, 2)}
    save_file(first, str(tmp_path / "one.safetensors"))
    save_file(second, str(tmp_path / "two.safetensors"))
    source = SafetensorsWeights(safetensors_files(tmp_path))
    assert "a" in source and "c" in source and "d" not in source
    assert source.numel() == 12 + 2 + 20
    assert source.values("a").dtype == torch.float32 and torch.equal(source.values("a"), first["a"].float())
    monkeypatch.setattr(SafetensorsWeights, "ROWS_AT_ONCE", 4)
    slices = list(source.row_slices("c"))
    assert [part.shape[0] for part in slices] == [4, 4, 2] and torch.equal(torch.cat(slices), second["c"])
    source.tie("d", "b")  # a missing LM head reads the embedding table
    assert "d" in source and torch.equal(source.values("d"), torch.ones(2))
    source.tie("a", "b")  # a head of its own stays its own
    assert torch.equal(source.values("a"), first["a"].float())
    with pytest.raises(UserError, match="^the model's files have no tensor for e$"):
        source.values("e")


def test_an_empty_model_holds_no_weights_but_real_rotary_tables():
    model = empty_model(tiny_config("llama", vocab_size=128, num_layers=2))
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}
    assert {buffer.device.type for buffer in model.buffers()} == {"cpu"}


def test_filling_reads_every_tensor_and_ties_a_missing_head(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    tensors = tiny_tensors(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    model = empty_model(config)
    report = fill_model(model, SafetensorsWeights(safetensors_files(tiny_model_dir)),
                        WeightChoice("float32", torch.float32))
    assert report.kind == "float32"
    assert not [name for name, parameter in model.named_parameters() if parameter.device.type == "meta"]
    ids = torch.tensor([[1, 504, 314, 260]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # the file's own head

    del tensors["lm_head.weight"]  # no head of its own: the embedding table serves as the head
    save_file(tensors, str(tmp_path / "model.safetensors"))
    tied = empty_model(config)
    fill_model(tied, SafetensorsWeights(safetensors_files(tmp_path)), WeightChoice("float32", torch.float32))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    reference.lm_head.weight = reference.model.embed_tokens.weight
    with torch.inference_mode():
        assert torch.equal(tied(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("change, message", [
    (lambda tensors: tensors.pop("model.layers.1.post_attention_layernorm.weight"),
     "the shards has no tensor for model.layers.1.post_attention_layernorm.weight: the files are incomplete or not "
     "of the architecture their config names"),
    (lambda tensors: tensors.update({"model.norm.weight": torch.ones(63)}),
     "the shards: the tensor for model.norm.weight holds 63 values where the model needs 64: the files and their "
     "config disagree"),
])
def test_files_that_do_not_fit_the_config_are_one_line(tiny_model_dir, tmp_path, change, message):
    from transformers import AutoConfig

    tensors = tiny_tensors(tiny_model_dir)
    change(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = empty_model(AutoConfig.from_pretrained(tiny_model_dir))
    with pytest.raises(UserError) as caught:
        fill_model(model, SafetensorsWeights(safetensors_files(tmp_path)), WeightChoice("float32", torch.float32),
                   what="the shards")
    assert str(caught.value) == message


def test_a_folder_whose_names_differ_from_the_models_is_left_to_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    tensors = {f"transformer.{name}": tensor for name, tensor in tiny_tensors(tiny_model_dir).items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = SafetensorsWeights(safetensors_files(tmp_path))
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert load_folder(tmp_path, source, config, WeightChoice("float32", torch.float32), "cpu", True, False) is None
