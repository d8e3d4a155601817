"""The packed tiles of a GGUF file's weights kept beside its cached metadata, so that a later run maps them instead of
packing them again.

Packing a 7B file's weights into d3's tiles takes 2.7–4 s of a 5–8 s load on this 2-core machine; mapping packed
tiles takes milliseconds, their pages coming in from the page cache as the first forward reads them
(docs/PERFORMANCE.md has the figures). So the first run packs straight into the pages of a cache file (shared
memory-mapped: the kernel writes them back to disk in the background, and the model holds no other copy), and later
runs of the same file (same path, size and modification time) with the same kernels (their tile layout and packing
sources) map that file. The file is written under a temporary name and renamed into place with its index last, so
an interrupted run leaves nothing a later one would read; one set of tiles is kept a model (writing one removes the
others). The pages are not flushed by d3: tiles written in another boot of the machine are packed again (a crash
before the kernel wrote them back could have left zeros). D3_TILE_CACHE=off turns it off; it is skipped, with one
line, where the disk has not twice the GGUF file's size free.

    file   models/<model>/tiles-<key>.bin: every weight's tiles, scales and offsets, each at a page boundary
    index  models/<model>/tiles-<key>.json: name of the stacked weights -> kind, rows, columns and, for the tiles,
           scale and offset, [offset, dtype, shape] (None: no offset)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from d3cli import kernels
from d3cli.core.model.gguf_tiles import PackedTiles

SWITCH = "D3_TILE_CACHE"
FORMAT = 1
PAGE = mmap.ALLOCATIONGRANULARITY
DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


BOOT = "__boot__"  # the index's record of the boot it was written in


def boot_id() -> str:
    """This boot of the machine. The tiles are never flushed by d3 (the kernel writes them back within about 30 s):
    an index written in another boot is not trusted, as a crash before writeback may have left pages of zeros; the
    first run after a reboot packs and writes them again."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def enabled() -> bool:
    return os.environ.get(SWITCH, "").lower() not in ("0", "off", "no", "false")


def _key(gguf_path: Path, tile_rows: int, unsigned: bool) -> str:
    """What the tiles depend on: the file (path, size, modification time), the kernels' layout and their packing."""
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{FORMAT}|{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{tile_rows}|"
                            f"{unsigned}".encode())
    here = Path(kernels.__file__).parent
    for name in ("pack.cpp", "blocks.h"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


class TileCache:
    """The tiles of one GGUF file for one kernel layout. Where the cache holds them, `get(name)` maps a weight's
    tiles from it. Otherwise `allocate` gives the packing kernel buffers in a new cache file's pages, `keep(name,
    packed)` notes where a weight's tiles lie, and `publish()` (once the model is built) puts the file in place;
    `abandon()` removes it when loading failed."""

    def __init__(self, folder: Path, gguf_path: Path, tile_rows: int, unsigned: bool):
        key = _key(gguf_path, tile_rows, unsigned)
        self.data, self.index_path = folder / f"tiles-{key}.bin", folder / f"tiles-{key}.json"
        self.index: dict = {}
        self.mapped = None
        self.staging: Path | None = None
        self.fd: int | None = None
        self.size = 0
        self.placed: dict[int, list] = {}  # data pointer -> [offset, dtype, shape] in the staging file
        self.skipped = ""  # why the tiles are not kept, once that is known
        if self.index_path.is_file() and self.data.is_file():
            try:
                index = json.loads(self.index_path.read_text())
                if index.pop(BOOT, None) == boot_id():  # written back by now: its pages reached the disk
                    self.index = index
                    self.mapped = np.memmap(self.data, dtype=np.uint8, mode="c")
                    return
            except (OSError, ValueError, AttributeError):
                pass
            self.index, self.mapped = {}, None
        free = shutil.disk_usage(folder).free
        needed = 2 * gguf_path.stat().st_size
        if free < needed:
            self.skipped = (f"the packed tiles are not kept for the next run: they take about "
                            f"{needed / 2 / 2**30:.1f} GiB, and the disk has {free / 2**30:.1f} GiB free")
            return
        _remove_stale(folder)
        self.staging = self.data.with_name(f"{self.data.name}.{os.getpid()}.partial")
        self.fd = os.open(self.staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def get(self, name: str):
        """The weights `name` (stacked names joined by "|") as gguf_tiles.PackedTiles mapped from the cache, or
        None."""
        entry = self.index.get(name) if self.mapped is not None else None
        if entry is None:
            return None
        tensors = []
        for part in entry["tensors"]:
            if part is None:
                tensors.append(None)
                continue
            offset, dtype, shape = part
            count = int(np.prod(shape)) * torch.empty((), dtype=DTYPES[dtype]).element_size()
            tensors.append(torch.from_numpy(self.mapped[offset:offset + count]).view(DTYPES[dtype]).reshape(shape))
        return PackedTiles(entry["kind"], *tensors, entry["rows"], entry["columns"])

    @property
    def allocate(self):
        """Buffers for the packing kernel (gguf_tiles.pack_joined's `allocate`): pages of the staging file while it
        is being written, else None (torch.empty)."""
        return self._allocate if self.fd is not None else None

    def _allocate(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        count = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        if count == 0 or self.fd is None:
            return torch.empty(shape, dtype=dtype)
        offset = self.size
        try:
            os.posix_fallocate(self.fd, offset, count)  # the disk space now: no SIGBUS when the pages go to disk
            region = mmap.mmap(self.fd, count, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=offset)
        except OSError as error:
            self.skipped = f"the packed tiles are not kept for the next run: {error}"
            self._close()
            return torch.empty(shape, dtype=dtype)
        self.size = offset + -(-count // PAGE) * PAGE
        tensor = torch.frombuffer(region, dtype=dtype).reshape(shape)
        self.placed[tensor.data_ptr()] = [offset, str(dtype).replace("torch.", ""), list(shape)]
        return tensor

    def keep(self, name: str, packed) -> None:
        """Note where weights `name`'s tiles lie in the staging file (those packed into its pages)."""
        if self.fd is None:
            return
        parts = []
        for tensor in (packed.tiles, packed.scale, packed.offset):
            if tensor is None:
                parts.append(None)
            elif tensor.data_ptr() in self.placed:
                parts.append(self.placed[tensor.data_ptr()])
            else:
                return
        self.index[name] = {"kind": packed.kernel_kind, "rows": packed.rows, "columns": packed.columns,
                            "tensors": parts}

    def publish(self) -> str:
        """Put the staging file and its index in place (the index last) and remove older tiles of the model;
        returns why the tiles are not kept, or "" (also when they were found, or nothing was packed)."""
        if self.fd is None or self.staging is None:
            return self.skipped
        if not self.index:
            self.abandon()
            return ""
        try:
            os.replace(self.staging, self.data)
            staging_index = self.index_path.with_name(f"{self.index_path.name}.{os.getpid()}.partial")
            staging_index.write_text(json.dumps({BOOT: boot_id(), **self.index}))
            os.replace(staging_index, self.index_path)
        except OSError as error:
            self.abandon()
            return f"the packed tiles are not kept for the next run: {error}"
        self._close()
        for other in self.data.parent.glob("tiles-*"):
            if other not in (self.data, self.index_path) and not other.name.endswith(".partial"):
                other.unlink(missing_ok=True)
        return ""

    def abandon(self) -> None:
        """Remove the staging file (the model's tensors in it stay mapped until they are freed)."""
        if self.staging is not None:
            self.staging.unlink(missing_ok=True)
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.skipped and self.staging is not None:
            self.staging.unlink(missing_ok=True)


def _remove_stale(folder: Path) -> None:
    """Staging files of processes that no longer run (killed while loading)."""
    for partial in folder.glob("tiles-*.partial"):
        pid = partial.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(OSError):
                partial.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
