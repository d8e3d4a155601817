"""What d3 caches of a GGUF file: its header read directly, the config, tokenizer and tensor names, converted once
per header (the weights are read from the file itself: tests/core/model/test_gguf_weights.py)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader
from gguf_files import EXACT, MIXED, write_tiny_gguf

from d3cli.base.errors import UserError
from d3cli.core.model import gguf_cache, loader
from d3cli.core.model.gguf_blocks import read_gguf


def test_the_header_reader_agrees_with_the_gguf_package(mixed_gguf):
    strings, tensors, data_start = read_gguf(mixed_gguf)
    reference = GGUFReader(str(mixed_gguf))
    assert data_start == reference.data_offset
    assert strings["general.architecture"] == "llama"
    assert [(t.name, t.type_name) for t in tensors] == [(t.name, t.tensor_type.name) for t in reference.tensors]
    for mine, theirs in zip(tensors, reference.tensors):
        assert np.array_equal(mine.data.reshape(-1), np.asarray(theirs.data).reshape(-1).view(np.uint8))


def same_header(mine, theirs) -> bool:
    return (mine.strings == theirs.strings and mine.data_start == theirs.data_start
            and [(t.name, t.type_name, t.rows, t.columns, t.shape, t.path, t.offset, t.nbytes) for t in mine.tensors]
            == [(t.name, t.type_name, t.rows, t.columns, t.shape, t.path, t.offset, t.nbytes) for t in theirs.tensors]
            and all(np.array_equal(a.data, b.data) for a, b in zip(mine.tensors, theirs.tensors)))


def test_a_header_read_before_comes_from_the_cache_until_the_file_changes(mixed_gguf, tmp_path, monkeypatch):
    import os
    import shutil

    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(mixed_gguf, copy)
    parsed = []

    def counting(path):
        parsed.append(path)
        return read_gguf(path)

    monkeypatch.setattr(gguf_cache, "read_gguf", counting)
    first = gguf_cache.read_header(copy)
    again = gguf_cache.read_header(copy)
    assert len(parsed) == 1 and same_header(again, read_gguf(copy)) and same_header(first, again)
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten: read it again
    gguf_cache.read_header(copy)
    assert len(parsed) == 2
    (kept,) = (tmp_path / "cache" / gguf_cache.HEADERS_FOLDER).iterdir()
    kept.write_text("{not json")  # a damaged cache file is read past
    assert same_header(gguf_cache.read_header(copy), first) and len(parsed) == 3


def test_the_cache_keeps_the_metadata_and_no_weights(mixed_gguf):
    folder = gguf_cache.cached_gguf_dir(mixed_gguf)
    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", gguf_cache.SOURCE_FILE} <= files
    assert not any(name.endswith(".safetensors") for name in files)
    metadata = [path for path in folder.iterdir() if not path.name.startswith("tiles-")]  # packed tiles apart
    assert sum(path.stat().st_size for path in metadata) < mixed_gguf.stat().st_size / 2
    types = gguf_cache.gguf_types(folder)
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_0"
    assert types["model.layers.0.self_attn.v_proj.weight"] == "Q6_K"
    assert types["model.layers.1.mlp.down_proj.weight"] == "F16"
    names = gguf_cache.gguf_names(folder)
    assert names["blk.1.ffn_down.weight"] == "model.layers.1.mlp.down_proj.weight"
    assert "output.weight" not in names  # tied: the file has no output.weight


def test_the_key_is_the_header_so_new_weights_under_the_same_header_share_it(mixed_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path / "cache"))
    same_header = write_tiny_gguf(tmp_path / "same.gguf", loader.embedded_gguf_path(), MIXED, seed=1)
    other_header = write_tiny_gguf(tmp_path / "other.gguf", loader.embedded_gguf_path(), EXACT, tied=False)
    first = gguf_cache.cached_gguf_dir(mixed_gguf)
    assert gguf_cache.cached_gguf_dir(same_header).name.split("-")[-2] == first.name.split("-")[-2]
    assert gguf_cache.cached_gguf_dir(other_header).name.split("-")[-2] != first.name.split("-")[-2]


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


def test_a_truncated_file_is_refused_naming_the_tensor_and_leaves_nothing(mixed_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(mixed_gguf.read_bytes()[:-5000])
    with pytest.raises(UserError, match=r"tensor \S+ ends at byte [\d,]+ but the file has [\d,]+ bytes"):
        loader.load(str(cut))
    assert not (tmp_path / "cache" / "models").exists() or list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_file_that_is_not_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUX" + bytes(100))
    with pytest.raises(UserError, match="not a GGUF file"):
        loader.load(str(fake))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(b"GGUF" + bytes(6))
    with pytest.raises(UserError, match="cut short"):
        loader.load(str(header_only))
