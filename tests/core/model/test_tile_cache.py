"""The packed tiles of a GGUF file kept in d3's cache (core/model/tile_cache.py): the first load writes them, a later one
maps them instead of packing (the same model to the bit), a changed file or D3_TILE_CACHE=off packs again, and a
failed write leaves nothing behind."""

from __future__ import annotations

import os

import pytest
import torch
from gguf_files import EXACT, write_tiny_gguf

from d3cli import kernels
from d3cli.core.model import gguf_cache, gguf_tiles, loader, weights

pytestmark = pytest.mark.skipif(not kernels.available(), reason="d3's kernels cannot be built here")

IDS = torch.tensor([[1, 504, 314, 260, 1694, 23, 282, 614, 30, 260]])


def logits(model):
    with torch.inference_mode():
        return model(IDS).logits


def tile_files(path):
    folder = gguf_cache.cached_gguf_dir(path)
    return sorted(file.name for file in folder.glob("tiles-*"))


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path / "cache"))  # this test's own cache (kernels already loaded)
    return write_tiny_gguf(tmp_path / "exact.gguf", loader.embedded_gguf_path(), EXACT)


@pytest.fixture
def packs(monkeypatch) -> list:
    """One entry per weight packed (gguf_tiles.pack_joined called) from now on: none when tiles are mapped."""
    calls, real = [], gguf_tiles.pack_joined

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(weights, "pack_joined", counting)  # where the loader looks it up
    return calls


def test_a_later_load_maps_the_tiles_the_first_one_packed(gguf, monkeypatch):
    first = loader.load(str(gguf))
    files = tile_files(gguf)
    assert len(files) == 2 and files[0].endswith(".bin") and files[1].endswith(".json")

    def no_packing(*args, **kwargs):
        raise AssertionError("packed again")

    monkeypatch.setattr(weights, "pack_joined", no_packing)
    second = loader.load(str(gguf))
    assert torch.equal(logits(second.model), logits(first.model))
    assert second.weights.step_bytes == first.weights.step_bytes


def test_a_changed_file_or_the_cache_turned_off_packs_again(gguf, monkeypatch, packs):
    loader.load(str(gguf))
    before = tile_files(gguf)
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the same bytes, touched
    packs.clear()
    loader.load(str(gguf))
    after = tile_files(gguf)
    assert packs and len(after) == 2 and after != before  # the new file's tiles, the old ones removed
    packs.clear()
    monkeypatch.setenv("D3_TILE_CACHE", "off")
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    loader.load(str(gguf))
    assert packs and tile_files(gguf) == after  # packed, and nothing written


def test_without_room_on_the_disk_nothing_is_kept_and_one_line_says_so(gguf, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    loaded = loader.load(str(gguf))
    assert tile_files(gguf) == [] and loaded.model is not None
    line = capsys.readouterr().err.strip()
    assert line.startswith("d3: the packed tiles are not kept for the next run:") and "\n" not in line


def test_a_load_that_fails_leaves_no_tiles(gguf, monkeypatch):
    from d3cli.core.model import weights

    real = weights.apply_weights
    calls = []

    def failing(model, choice, *args, progress=None, **kwargs):
        def on_layer(done, total):
            calls.append(done)
            if done == 1:
                raise KeyboardInterrupt
        return real(model, choice, *args, progress=on_layer, **kwargs)

    monkeypatch.setattr("d3cli.core.model.streamed.apply_weights", failing)
    with pytest.raises(KeyboardInterrupt):
        loader.load(str(gguf))
    assert calls == [1] and tile_files(gguf) == []


def test_a_staging_file_of_a_killed_process_is_removed(gguf, tmp_path):
    loader.load(str(gguf))
    folder = gguf_cache.cached_gguf_dir(gguf)
    stale = folder / "tiles-0123456789abcdef.bin.999999999.partial"
    stale.write_bytes(b"half")
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))  # a new key: tiles written again
    loader.load(str(gguf))
    assert not stale.exists() and len(tile_files(gguf)) == 2


def test_tiles_written_in_another_boot_are_packed_again(gguf, monkeypatch, packs):
    from d3cli.core.model import tile_cache

    loader.load(str(gguf))
    packs.clear()
    loader.load(str(gguf))
    assert not packs  # the same boot: mapped
    monkeypatch.setattr(tile_cache, "boot_id", lambda: "another boot")
    loader.load(str(gguf))
    assert packs and len(tile_files(gguf)) == 2  # packed and written again, for this boot
    packs.clear()
    loader.load(str(gguf))
    assert not packs
