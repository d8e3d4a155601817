"""A GGUF file's cached copy: its blocks as they are, every weight kind built from it, against transformers' own
reading of the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf_files import write_tiny_gguf

from d3cli import kernels
from d3cli.core import gguf_cache, loader
from d3cli.core.gguf_blocks import read_gguf
from d3cli.core.quantized import Int4Linear
from d3cli.core.weights import FILE_KIND, WeightChoice, quantized_dtype

# One layer of every kind d3 meets: exact 4-bit types, Q8_0, a 6-bit type without an exact form, a float type.
MIXED = {"blk.0.attn_q": "Q4_0", "blk.0.attn_v": "Q6_K", "blk.0.attn_output": "Q4_K", "blk.0.ffn_down": "Q8_0",
         "blk.1.ffn_down": "F16"}
EXACT = {"blk.0.attn_q": "Q4_0", "blk.0.attn_output": "Q4_K", "output": "Q4_1"}  # every linear layer exact


@pytest.fixture(scope="session")
def mixed_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", loader.embedded_gguf_path(), MIXED)


@pytest.fixture(scope="session")
def exact_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "exact.gguf", loader.embedded_gguf_path(), EXACT,
                           tied=False)


def logits(model):
    ids = torch.tensor([[1, 504, 314, 260, 1694, 23, 282, 614, 30, 260, 2030, 1000, 17, 99]])  # < the 2048 tokens
    with torch.inference_mode():
        return model(ids).logits.float()


def test_the_header_reader_agrees_with_the_gguf_package(mixed_gguf):
    strings, tensors = read_gguf(mixed_gguf)
    reference = GGUFReader(str(mixed_gguf))
    assert strings["general.architecture"] == "llama"
    assert [(t.name, t.type_name) for t in tensors] == [(t.name, t.tensor_type.name) for t in reference.tensors]
    for mine, theirs in zip(tensors, reference.tensors):
        assert np.array_equal(mine.data.reshape(-1), np.asarray(theirs.data).reshape(-1).view(np.uint8))


def test_the_cache_keeps_the_blocks_and_records_each_type(mixed_gguf):
    folder = gguf_cache.cached_gguf_dir(mixed_gguf)
    assert {"blocks.safetensors", "dense.safetensors", "config.json", "tokenizer.json"} <= {
        path.name for path in folder.iterdir()}
    types = gguf_cache.gguf_types(folder)
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_0"
    assert types["model.layers.0.self_attn.v_proj.weight"] == "Q6_K"
    forms, dense = gguf_cache.read_block_files(folder)
    assert "model.layers.0.self_attn.o_proj.weight" in forms  # Q4_K
    assert "model.layers.0.self_attn.v_proj.weight" not in forms and "model.layers.0.self_attn.v_proj.weight" in dense
    assert "model.layers.1.mlp.down_proj.weight" in dense  # F16
    assert "lm_head.weight" not in dense  # tied: the embedding's blocks


def test_a_conversion_parses_the_file_once_and_leaves_gguf_as_it_was(mixed_gguf, tmp_path, monkeypatch):
    import gguf

    opened = []

    class CountingReader(GGUFReader):
        def __init__(self, path, mode="r"):
            opened.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path))  # a conversion of its own, not the shared one
    folder = gguf_cache.cached_gguf_dir(mixed_gguf)
    assert (folder / gguf_cache.SOURCE_FILE).is_file()
    assert opened == [str(mixed_gguf)]  # transformers asks three times: tokenizer, config, weights
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map


def test_conversions_started_together_convert_once(mixed_gguf, tmp_path, monkeypatch):
    import threading
    import time

    conversions = []
    convert = gguf_cache._convert_gguf

    def slow_convert(path, out_dir):
        conversions.append(path)
        time.sleep(0.5)  # long enough for the other threads to arrive while it converts
        return convert(path, out_dir)

    monkeypatch.setattr(gguf_cache, "_convert_gguf", slow_convert)
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path))
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(gguf_cache.cached_gguf_dir(mixed_gguf)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1 and len(folders) == 3 and len(set(folders)) == 1
    assert (folders[0] / gguf_cache.SOURCE_FILE).is_file()
    assert [path.name for path in (tmp_path / "models").iterdir()] == [folders[0].name]  # no staging folder left


def test_dense_weights_from_the_cache_equal_transformers_reading_of_the_file(mixed_gguf):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(mixed_gguf.parent), gguf_file=mixed_gguf.name,
                                                     dtype=torch.float32)
    cached = loader.load(str(mixed_gguf), weights="float32")
    assert cached.weights.kind == "float32"
    assert torch.equal(logits(cached.model), logits(reference))


def test_auto_runs_each_tensor_as_the_nearest_kind_of_its_type(mixed_gguf):
    loaded = loader.load(str(mixed_gguf))
    report = loaded.weights
    activations = str(quantized_dtype()).replace("torch.", "")  # float32 on d3's kernels, bfloat16 on torch's
    assert (report.kind, report.dtype, report.head_kind, report.group_size) == ("int4", activations, "int8", 32)
    assert report.sources == {"gguf Q4_0 as it is": 1, "gguf Q4_K as it is": 1, "gguf Q4_1 as it is": 9,
                              "gguf Q6_K re-quantized to int8": 1, "gguf Q8_0 as it is": 2,
                              "gguf F16 dequantized": 1}
    assert report.modules["int8 embedding"] == 1
    assert report.label() == (f"int4 (group 32; 1 {activations}; 2 int8), LM head int8, {activations} activations, "
                              f"{kernels_phrase()}")
    dense = loader.load(str(mixed_gguf), weights="float32")
    assert report.step_bytes < dense.weights.step_bytes / 3


def kernels_phrase() -> str:
    """How the weights line names the kernels quantized weights run on here."""
    return kernels.description() if kernels.available() else "torch kernels"


def test_a_file_of_exact_types_runs_as_its_own_dequantized_weights(exact_gguf):
    """On torch's kernels (float activations): the file's values to float rounding. (d3's kernels quantize the
    activations to int8, which these random weights amplify; tests/kernels/ checks their arithmetic exactly.)"""
    folder = gguf_cache.cached_gguf_dir(exact_gguf)
    with kernels.turned_off():
        quantized, _, report = gguf_cache.load_cached(folder, WeightChoice(FILE_KIND, torch.float32), "cpu")
    assert set(report.modules) == {"int4", "int8 embedding"} and report.head_kind == "int4"
    dense = loader.load(str(exact_gguf), weights="float32")
    expected = logits(dense.model)
    assert (logits(quantized) - expected).abs().max() < 1e-4 * expected.abs().max()


def test_int4_with_a_group_size_keeps_the_files_blocks_and_groups_the_rest(mixed_gguf):
    loaded = loader.load(str(mixed_gguf), weights="int4", group_size=64)
    report = loaded.weights
    assert report.sources["gguf Q4_1 as it is"] == 9 and report.sources["gguf Q6_K re-quantized to int4"] == 1
    groups = {module.group_size for module in loaded.model.modules() if isinstance(module, Int4Linear)}
    assert groups == {32, 64}


HELD_OUT_TEXT = """Rayleigh scattering makes the sky blue: air molecules scatter short wavelengths of sunlight far more
than long ones, so blue light reaches our eyes from every direction of the sky. At sunset the light crosses much more
air, the blue is scattered away before it arrives, and the reds and oranges remain.

A bakery sells muffins for 3 dollars each and cookies for 75 cents each. On Monday it sold 48 muffins and twice as
many cookies. The muffins brought in 48 * 3 = 144 dollars, the 96 cookies 96 * 0.75 = 72 dollars, so the bakery took
144 + 72 = 216 dollars that day.

def fibonacci(n):
    \"\"\"Return the n-th Fibonacci number, counting from fibonacci(0) = 0.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

The committee met on Thursday to review the proposal. After a long discussion about the budget and the schedule,
the members agreed to postpone the vote until the engineers had estimated the cost of the second phase."""


@pytest.fixture(scope="session")
def embedded_default():
    """The embedded model as `d3 generate` loads it by default: its GGUF file's own precision."""
    return loader.load(None)


def nll_and_top1(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        log_probs = model(ids).logits.float().log_softmax(-1)[0, :-1]
    return float(-log_probs.gather(-1, ids[0, 1:, None]).mean()), log_probs.argmax(-1)


@pytest.mark.embedded
def test_the_embedded_model_runs_its_files_blocks_within_a_hundredth_of_a_nat(embedded, embedded_default):
    report = embedded_default.weights
    assert report.sources == {"gguf Q4_1 as it is": 210, "gguf Q8_0 as it is": 1}
    activations = str(quantized_dtype()).replace("torch.", "")
    assert report.label() == f"int4 (group 32), LM head int8, {activations} activations, {kernels_phrase()}"
    assert report.step_bytes < embedded.weights.step_bytes / 5  # 97 MB a step against 538 MB in float32
    ids = embedded.tokenizer(HELD_OUT_TEXT, return_tensors="pt").input_ids
    reference, reference_top1 = nll_and_top1(embedded.model, ids)
    nll, top1 = nll_and_top1(embedded_default.model, ids)  # int8 (d3) or bfloat16 (torch) activations, no more
    assert abs(nll - reference) < 0.01
    assert (top1 == reference_top1).float().mean() > 0.9
    # torch's kernels with float32 activations (slow: a shorter text): the file's values, to float rounding
    with kernels.turned_off():
        file_precision = loader.load(None, weights="int4", dtype="float32")
    short = ids[:, :40]
    nll32, top1_32 = nll_and_top1(file_precision.model, short)
    reference32, reference32_top1 = nll_and_top1(embedded.model, short)
    assert abs(nll32 - reference32) < 1e-3 and (top1_32 == reference32_top1).float().mean() > 0.98

