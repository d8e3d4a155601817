"""d3's own CPU kernels for quantized weights, built once per machine from the C++ beside this file.

    blocks.h            the arithmetic of blocks of 32: int8 activations, integer dot products (AVX2, VNNI)
    linear.cpp          torch.ops.d3.tiled_linear (q4_linear, q8_linear): a quantized linear layer of any kind of
                        blocks.h (q4, q5, q8, GGUF's k-quants as stored), any number of rows
    decoder_layer.cpp   torch.ops.d3.decoder_layer(s): Llama-family layers in one call and one thread team
    attention.cpp       the decoder layer's attention over its float16 key/value cache, in chunks of 64 positions
    argmax.cpp          torch.ops.d3.argmax: the greedy token, as torch.argmax picks it, faster
    pack.cpp            torch.ops.d3.pack_gguf_into: a GGUF file's blocks (Q4_0 … Q8_0, Q4_K, Q5_K, Q6_K) into
                        the tiles, in one pass

Why: torch's own int4/int8 weight-only kernels keep activations in bfloat16 and dequantize every weight, which on an
AVX2 CPU costs more than streaming the weights does; these kernels quantize the activations to int8 per block of 32
(as llama.cpp does) and take one integer dot product per block, so a decode step is bound by the weights' bytes.
They are compiled with the host's own instruction set (`-march=native`; D3_KERNELS_MARCH=haswell builds the AVX2
path on any x86-64 machine) the first time quantized weights run, into d3's cache (keyed by the sources, torch's
version, the compiler, the flags and the CPU), about 20 s once. Without a C++ compiler, or with D3_KERNELS=off, d3
runs torch's kernels instead and says so in the weights it reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

SOURCES = ("linear.cpp", "decoder_layer.cpp", "attention.cpp", "argmax.cpp", "pack.cpp")
HEADERS = ("blocks.h", "linear.h", "attention.h", "vector_math.h")
LIBRARY = "d3_kernels.so"
SWITCH = "D3_KERNELS"  # "off": torch's kernels only
ARCHITECTURE = "D3_KERNELS_MARCH"  # the -march they are built for: native (the default), or e.g. haswell for AVX2


@cache
def load() -> str | None:
    """Build (once) and load d3's kernels into torch.ops.d3; None when they are available, else why not."""
    if os.environ.get(SWITCH, "").lower() in ("0", "off", "no", "false"):
        return f"{SWITCH}={os.environ[SWITCH]}"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"d3's kernels are built for x86-64 Linux, not {sys.platform} {platform.machine()}"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler or not shutil.which(compiler):
        return f"no C++ compiler{f' ({compiler} not found)' if compiler else ''}: install g++, or set CXX"
    import torch

    try:
        library = _built(compiler)
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return f"could not build d3's kernels: {str(error).strip().splitlines()[-1] if str(error).strip() else error}"
    return None


_turned_off = False


def available() -> bool:
    """True when quantized weights built now run on d3's kernels (building them first if need be)."""
    return not _turned_off and load() is None


def loaded() -> bool:
    """True when d3's kernels are already loaded in this process (never builds them)."""
    return load.cache_info().currsize > 0 and load() is None


@contextlib.contextmanager
def turned_off():
    """Quantized weights built inside run on torch's kernels (for side-by-side measurements and tests)."""
    global _turned_off
    saved, _turned_off = _turned_off, True
    try:
        yield
    finally:
        _turned_off = saved


@cache
def layout() -> tuple[int, bool]:
    """How the loaded kernels want weights packed: rows a tile, and whether q8 tiles hold w + 128."""
    import torch

    tile_rows, unsigned = torch.ops.d3.layout()
    return int(tile_rows), bool(unsigned)


def description() -> str:
    """Which kernels quantized weights built now run: d3's and their instruction set, or torch's and why."""
    reason = "turned off" if _turned_off else load()
    if reason is None:
        import torch

        return f"d3 kernels ({torch.ops.d3.instruction_set()})"
    return f"torch kernels ({reason})"


def cache_folder() -> Path:
    """Where built kernels are kept: one folder per source, torch, compiler and CPU."""
    from d3cli.base.paths import cache_home

    return cache_home() / "kernels"


def _built(compiler: str) -> Path:
    """The compiled library for this machine, compiling it first if needed (into a temporary file renamed into place,
    so an interrupted build leaves nothing half-written)."""
    import torch

    here = Path(__file__).resolve().parent
    flags = _flags()
    key = hashlib.sha256()
    for name in SOURCES + HEADERS:
        key.update((here / name).read_bytes())
    for part in (torch.__version__, compiler, _compiler_version(compiler), " ".join(flags), _cpu_identity()):
        key.update(part.encode())
    folder = cache_folder() / key.hexdigest()[:16]
    library = folder / LIBRARY
    if library.is_file():
        return library
    from d3cli.base.paths import exclusive

    with exclusive(f"kernels-{folder.name}"):  # processes started together build once; the rest wait for it
        if not library.is_file():
            _compile(compiler, flags, here, library)
    return library


def _compile(compiler: str, flags: list[str], here: Path, library: Path) -> None:
    """Compile the sources beside this file into `library`."""
    folder = library.parent
    folder.mkdir(parents=True, exist_ok=True)
    if sys.stderr.isatty():
        sys.stderr.write("d3: building its CPU kernels for this machine once (about 20 seconds)\n")
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()] + [f"-I{here}"]
    libraries = cpp_extension.library_paths()
    handle, staging = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=folder)
    os.close(handle)
    try:
        objects = []
        processes = []
        for name in SOURCES:  # the translation units in parallel, then one link
            target = f"{staging}.{name}.o"
            objects.append(target)
            processes.append(subprocess.Popen([compiler, *flags, *includes, "-c", str(here / name), "-o", target],
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for process in processes:
            _, errors = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(_last_error(errors))
        link = [compiler, "-shared", "-fopenmp", *objects, "-o", staging, *(f"-L{path}" for path in libraries),
                "-lc10", "-ltorch_cpu", *(f"-Wl,-rpath,{path}" for path in libraries)]
        result = subprocess.run(link, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(_last_error(result.stderr))
        os.replace(staging, library)
    finally:
        for leftover in [staging, *(f"{staging}.{name}.o" for name in SOURCES)]:
            if os.path.exists(leftover):
                os.remove(leftover)


def _flags() -> list[str]:
    import torch

    return ["-O3", f"-march={os.environ.get(ARCHITECTURE) or 'native'}", "-fopenmp", "-ffp-contract=off", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_identity() -> str:
    """The CPU's model and flags: a library built with -march=native runs only where they are the same."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _last_error(errors: str) -> str:
    lines = [line for line in errors.splitlines() if "error" in line]
    return (lines[0] if lines else errors.strip().splitlines()[-1] if errors.strip() else "the compiler failed")[:300]
