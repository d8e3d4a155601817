"""A GGUF file's weights read from the file tensor by tensor: every weight kind against transformers' own
(dequantized) reading of the same file, every family the tests write, and memory that follows the file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from gguf_files import FAMILIES, Shape, write_tiny_gguf

from d3cli import kernels
from d3cli.core.model import gguf_cache, loader
from d3cli.core.model.gguf_blocks import nearest_kind, read_gguf
from d3cli.core.model.gguf_weights import GGUFRowsEmbedding, load_gguf
from d3cli.core.model.quantized import Int4Linear
from d3cli.core.model.weight_choice import FILE_KIND, WeightChoice, quantized_dtype

IDS = torch.tensor([[1, 504, 314, 260, 1694, 23, 282, 614, 30, 260, 2030, 1000, 17, 99]])  # < the 2048 tokens


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits.float()


def transformers_reading(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def kernels_phrase() -> str:
    """How the weights line names the kernels quantized weights run on here."""
    return kernels.description() if kernels.available() else "torch kernels"


def test_dense_weights_read_from_the_file_equal_transformers_reading_of_it(mixed_gguf):
    cached = loader.load(str(mixed_gguf), weights="float32")
    assert cached.weights.kind == "float32"
    assert torch.equal(logits(cached.model), logits(transformers_reading(mixed_gguf)))


def test_auto_runs_each_tensor_as_the_nearest_kind_of_its_type(mixed_gguf):
    loaded = loader.load(str(mixed_gguf))
    report = loaded.weights
    activations = str(quantized_dtype()).replace("torch.", "")  # float32 on d3's kernels, bfloat16 on torch's
    assert (report.kind, report.dtype, report.head_kind, report.group_size) == ("int4", activations, "int8", 32)
    stored = kernels.available()  # Q6_K runs as stored (int6) on d3's kernels, else re-quantized to int8
    assert report.sources == {"gguf Q4_0 as it is": 1, "gguf Q4_K as it is": 1, "gguf Q4_1 as it is": 9,
                              "gguf Q6_K as it is" if stored else "gguf Q6_K re-quantized to int8": 1,
                              "gguf Q8_0 as it is": 2, "gguf F16 dequantized": 1}
    assert report.modules["int8 embedding"] == 1
    others = f"1 {activations}; 1 int6; 1 int8" if stored else f"1 {activations}; 2 int8"
    assert report.label() == (f"int4 (group 32; {others}), LM head int8, {activations} activations, "
                              f"{kernels_phrase()}")
    dense = loader.load(str(mixed_gguf), weights="float32")
    assert report.step_bytes < dense.weights.step_bytes / 3


def test_a_file_of_exact_types_runs_as_its_own_dequantized_weights(exact_gguf):
    """On torch's kernels (float activations): the file's values to float rounding. (d3's kernels quantize the
    activations to int8, which these random weights amplify; tests/kernels/ checks their arithmetic exactly.)"""
    folder = gguf_cache.cached_gguf_dir(exact_gguf)
    header = gguf_cache.read_header(exact_gguf)
    with kernels.turned_off():
        quantized, _, report = load_gguf(exact_gguf, folder, header, WeightChoice(FILE_KIND, torch.float32), "cpu")
    assert set(report.modules) == {"int4", "int8 embedding"} and report.head_kind == "int4"
    expected = logits(transformers_reading(exact_gguf))
    assert (logits(quantized) - expected).abs().max() < 1e-4 * expected.abs().max()


def test_int4_with_a_group_size_keeps_the_files_blocks_and_groups_the_rest(mixed_gguf):
    loaded = loader.load(str(mixed_gguf), weights="int4", group_size=64)
    report = loaded.weights
    assert report.sources["gguf Q4_1 as it is"] == 9 and report.sources["gguf Q6_K re-quantized to int4"] == 1
    groups = {module.group_size for module in loaded.model.modules() if isinstance(module, Int4Linear)}
    assert groups == {32, 64}


@pytest.mark.parametrize("table", ["Q4_K", "Q6_K", "Q4_0"])
def test_an_embedding_of_any_quantized_type_stays_in_the_file_and_reads_its_rows_exactly(tmp_path, table):
    path = write_tiny_gguf(tmp_path / f"{table}.gguf", loader.embedded_gguf_path(), {"token_embd": table})
    loaded = loader.load(str(path))
    embedding = loaded.model.get_input_embeddings()
    assert isinstance(embedding, GGUFRowsEmbedding) and loaded.weights.modules[f"{table} embedding"] == 1
    reference = transformers_reading(path).get_input_embeddings().weight
    ids = torch.tensor([[0, 5, 2047, 5, 77]])
    assert torch.equal(embedding(ids)[0], reference[ids[0]])
    tensor = next(t for t in read_gguf(path).tensors if t.name == "token_embd.weight")
    assert embedding.weight_bytes() == embedding.table.numel() == tensor.nbytes  # the file's bytes of the table


FAMILY_TYPES = {"blk.0.attn_q": "Q4_0", "blk.0.attn_k": "Q4_K", "blk.1.ffn_down": "Q6_K", "token_embd": "Q8_0"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_every_family_quantized_scores_as_its_dequantized_weights(tmp_path, family):
    """Each family's file in its own precision (torch's kernels, float activations: the exact types to float
    rounding, the Q6_K weight re-quantized to int8) against transformers' float reading of the same file: the
    scaled embedding, (1 + w) norms, q/k norms and biases all kept."""
    heads = 2 if family == "qwen3" else 4  # transformers reads Qwen3 files with its default head_dim, 128
    path = write_tiny_gguf(tmp_path / f"{family}.gguf", loader.embedded_gguf_path(), FAMILY_TYPES,
                           architecture=family, shape=Shape(heads=heads, kv_heads=heads // 2))
    reference = transformers_reading(path)
    dense = loader.load(str(path), weights="float32")
    expected = logits(reference)
    assert torch.equal(logits(dense.model), expected)
    with kernels.turned_off():
        model, _, report = load_gguf(path, gguf_cache.cached_gguf_dir(path), gguf_cache.read_header(path),
                                     WeightChoice(FILE_KIND, torch.float32), "cpu")
    assert report.sources["gguf Q8_0 as it is"] == 1 and report.modules["int8 embedding"] == 1  # head and table
    got = logits(model)
    targets = IDS[0, 1:]
    nll = [float(torch.nn.functional.cross_entropy(values[0, :-1], targets)) for values in (got, expected)]
    assert abs(nll[0] - nll[1]) < 0.05
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


STORED_TYPES = {"attn_q": "Q5_0", "attn_k": "Q5_1", "attn_v": "Q6_K", "attn_output": "Q5_K", "ffn_gate": "Q4_K",
                "ffn_up": "Q4_0", "ffn_down": "Q6_K", "output": "Q6_K"}


@pytest.mark.skipif(not kernels.available(), reason="d3's kernels cannot be built here")
@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_every_type_d3_runs_as_stored_scores_as_the_files_dequantized_weights(tmp_path, family):
    """Q4_0, Q4_K, Q5_0, Q5_1, Q5_K and Q6_K on d3's kernels, as the file stores them (the decoder layer in one
    kernel call), against transformers' float reading of the same file, and every weight's bytes those of the file.
    The kernels' products are the dequantized weights' exactly (test_gguf_tiles.py); what differs here is the int8
    rounding of the activations and the float16 KV cache, which on these random models (logits up to 11) move the
    logits by 1–2 % and the NLL by 0.002–0.008 nats a token, as much as for a Q4_1 file (what d3 ran before): a
    wrong row order or stacking would move them by nats."""
    path = write_tiny_gguf(tmp_path / f"{family}.gguf", loader.embedded_gguf_path(), STORED_TYPES, tied=False,
                           architecture=family)
    loaded = loader.load(str(path))
    report = loaded.weights
    assert {source for source in report.sources if "as it is" not in source} <= {"gguf F32 dequantized"}
    roles = Shape().roles(FAMILIES[family].get("fused", False))  # Phi-3: q/k/v in one tensor, gate/up in another
    per_layer = Counter(nearest_kind(STORED_TYPES.get(role, "Q4_1")) for role in roles)
    assert report.modules["int5"] == 2 * per_layer["int5"] and report.modules["int6"] == 2 * per_layer["int6"] + 1
    assert report.head_kind == "int6" and "int6" in report.label()
    ids = torch.randint(0, 2048, (1, 96), generator=torch.Generator().manual_seed(0))  # 95 tokens: the int8
    expected = logits(transformers_reading(path), ids)  # activations' rounding averages out over them
    got = logits(loaded.model, ids)
    targets = ids[0, 1:]
    nll = [float(torch.nn.functional.cross_entropy(values[0, :-1], targets)) for values in (got, expected)]
    assert abs(nll[0] - nll[1]) < 0.01
    assert (got - expected).abs().mean() < 0.03 * expected.abs().mean()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9  # near-ties of a random model aside
    header = gguf_cache.read_header(path)
    in_file = sum(tensor.nbytes for tensor in header.tensors if tensor.name.startswith("blk.")) + header_bytes(
        header, "output.weight")
    assert report.step_bytes == in_file  # the file's bytes (Q5_0 beside Q5_1 not stacked: no −16d offsets added)


def header_bytes(header, name: str) -> int:
    return next(tensor.nbytes for tensor in header.tensors if tensor.name == name)


MEMORY_PROBE = """
import json, resource, sys
from d3cli.core.model import loader
import d3cli.core.model.gguf_weights, transformers, torch
loader.load(None, weights="float32").model  # imports and kernels in place: what loading a model costs beside
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loaded = loader.load(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after, "step_bytes": loaded.weights.step_bytes}))
"""


def test_loading_takes_about_the_files_size_not_a_float_copy(tmp_path):
    """A 160 MB Q4_0 file (its float32 model would be 1.2 GB): the peak memory a load adds stays within the file's
    size and one float tensor, far below the float copy transformers' loader makes first."""
    shape = Shape(hidden=1024, ffn=4096, heads=8, kv_heads=8, layers=16)
    path = write_tiny_gguf(tmp_path / "big.gguf", loader.embedded_gguf_path(),
                           {role: "Q4_0" for role in shape.roles()} | {"token_embd": "Q4_0"}, shape=shape)
    size = path.stat().st_size
    float_copy = size / 18 * 32 * 4
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True,
                           timeout=600)
    assert probe.returncode == 0, probe.stderr[-2000:]
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    added = measured["after"] - measured["before"]
    assert added < 1.3 * size + 4 * shape.ffn * shape.hidden * 4, (added, size)
    assert added < float_copy / 4
