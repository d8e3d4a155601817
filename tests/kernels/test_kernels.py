"""d3's CPU kernels (d3cli/kernels): built once, their products exactly those of the dequantized weights and the
quantized activations, every row the same alone or in a batch, on one thread or two; and the fallback when they
cannot be built."""

from __future__ import annotations

import pytest
import torch

from d3cli import kernels
from d3cli.core.model.quantized import (
    AffineInt4,
    BlockInt8,
    BlockInt8Linear,
    Int4Linear,
    Int8Linear,
    exact_scales,
    pack_int4_tiles,
    pack_int8_tiles,
    pack_tile_scales,
    quantize_int4,
    quantize_int8,
)

pytestmark = [pytest.mark.skipif(not kernels.available(), reason=f"d3's kernels: {kernels.load()}"),
              pytest.mark.usefixtures("thread_team")]


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: per block of 32, d·q with d = max|x| / 127 and q = x·(127 / max|x|) rounded to
    the nearest integer (ties to even), in float32 as blocks.h computes them."""
    rows, columns = x.shape
    blocks = x.float().reshape(rows, columns // 32, 32)
    largest = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(largest > 0, torch.tensor(127.0) / largest, torch.zeros_like(largest))
    q = torch.round(blocks * inverse)
    return (q * (largest / 127)).reshape(rows, columns)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = quantized_activations(x).double() @ weight.double().T
    return out if bias is None else out + bias.double()


def assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert (out.double() - expected).abs().max().item() <= 2e-6 * scale + 1e-7


def random_int4(rows: int, columns: int, group: int, seed: int, halves: bool) -> AffineInt4:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, columns), dtype=torch.uint8, generator=generator)
    scale = torch.rand(rows, columns // group, generator=generator) / 10
    offset = -torch.rand(rows, columns // group, generator=generator)
    if halves:  # a GGUF file's scales: exact in float16
        scale, offset = scale.half().float(), offset.half().float()
    return AffineInt4(q, scale, offset)


@pytest.mark.parametrize("rows", [16, 40, 7, 33])  # whole tiles and padded ones
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("halves", [True, False])
def test_int4_products_are_the_dequantized_weights_times_the_quantized_activations(rows, group, halves):
    form = random_int4(rows, 256, group, seed=rows + group, halves=halves)
    bias = torch.randn(rows)
    layer = Int4Linear(form, bias, torch.float32)
    assert layer.tiled.scale.dtype == (torch.float16 if halves else torch.float32)
    for tokens in (1, 3, 20):
        x = torch.randn(tokens, 256) * torch.linspace(0.1, 4, 256)
        assert_matches(layer(x), reference(x, form.dequantize(), bias))


@pytest.mark.parametrize("rows", [16, 9, 49])
def test_q8_0_blocks_and_int8_per_channel_are_exact_in_the_same_sense(rows):
    generator = torch.Generator().manual_seed(rows)
    table = BlockInt8(torch.randint(-128, 128, (rows, 96), dtype=torch.int8, generator=generator),
                      torch.rand(rows, 3, generator=generator).half().float() / 50)
    x = torch.randn(5, 96)
    assert_matches(BlockInt8Linear(table, None, torch.float32)(x), reference(x, table.dequantize()))
    q, scale = quantize_int8(torch.randn(rows, 96))
    assert_matches(Int8Linear(q, scale, None, torch.float32)(x), reference(x, q.float() * scale[:, None]))


def test_every_row_is_computed_the_same_alone_in_a_batch_or_on_one_thread():
    form = random_int4(100, 512, 32, seed=3, halves=True)
    layer = Int4Linear(form, None, torch.float32)
    x = torch.randn(9, 512)
    batched = layer(x)
    for row in range(9):
        assert torch.equal(layer(x[row : row + 1])[0], batched[row])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(layer(x), batched)
    finally:
        torch.set_num_threads(threads)


def test_products_stay_close_to_the_float_ones():
    """int8 activations per block of 32: under 1% of the output's scale; an outlier coarsens only its own block."""
    weight = torch.randn(64, 512) / 20
    form = quantize_int4(weight)
    layer = Int4Linear(form, None, torch.float32)
    x = torch.randn(4, 512)
    exact = x.double() @ form.dequantize().double().T
    assert (layer(x).double() - exact).abs().max() < 0.01 * exact.abs().max()
    x[:, 7] = 40.0  # an outlier channel: block 0 steps by 40/127, the others as before
    exact = x.double() @ form.dequantize().double().T
    error = (layer(x).double() - exact).abs().max()
    block_zero = (x[:, :32].double() - quantized_activations(x)[:, :32].double()).abs().sum(-1).max()
    assert error < 0.01 * exact.abs().max() + block_zero * form.dequantize().abs().max()


def test_bfloat16_activations_come_back_in_bfloat16():
    form = random_int4(32, 64, 32, seed=1, halves=True)
    out = Int4Linear(form, None, torch.bfloat16)(torch.randn(2, 64).bfloat16())
    assert out.dtype == torch.bfloat16


def test_tiles_hold_the_weights_where_the_kernels_read_them():
    """The packing, read back by hand: tile t, block b, quad j, row r, element i."""
    tile_rows, unsigned = kernels.layout()
    q = torch.randint(0, 16, (tile_rows + 3, 64), dtype=torch.uint8)
    tiles = pack_int4_tiles(q, tile_rows)
    assert tiles.shape == (2, 2 * 4 * tile_rows * 4)
    for t, b, j, r, i in [(0, 0, 0, 0, 0), (0, 1, 3, tile_rows - 1, 2), (1, 0, 2, 2, 3), (1, 1, 1, 0, 1)]:
        byte = int(tiles[t, ((b * 4 + j) * tile_rows + r) * 4 + i])
        row = t * tile_rows + r
        assert byte & 15 == q[row, 32 * b + 4 * j + i] and byte >> 4 == q[row, 32 * b + 16 + 4 * j + i]
    signed = torch.randint(-128, 128, (tile_rows, 32), dtype=torch.int8)
    packed = pack_int8_tiles(signed, tile_rows, unsigned)
    byte = int(packed[0, (5 * tile_rows + 1) * 4 + 2])
    assert byte == (int(signed[1, 22]) + 128 if unsigned else int(signed[1, 22]) & 255)
    scales = pack_tile_scales(torch.arange(3 * 4.0).reshape(3, 4), tile_rows)
    assert scales.shape == (1, 4, tile_rows) and scales[0, 2, 1] == 6.0 and scales[0, 2, 3] == 0.0


def test_scales_are_half_precision_only_where_that_is_exact():
    exact = torch.tensor([0.5, 0.125, -3.0])
    assert exact_scales(exact)[0].dtype == torch.float16
    assert exact_scales(exact, torch.tensor([0.1]))[0].dtype == torch.float32  # 0.1 is not a float16


def test_the_kernels_build_once_into_the_cache_and_say_what_they_run():
    assert kernels.description().startswith("d3 kernels (")
    assert torch.ops.d3.instruction_set() in ("avx512-vnni", "avx2-vnni", "avx2", "portable")
    assert list((kernels.cache_folder()).glob("*/" + kernels.LIBRARY))


def test_turned_off_they_leave_quantized_weights_to_torch():
    form = random_int4(16, 64, 32, seed=2, halves=True)
    with kernels.turned_off():
        layer = Int4Linear(form, None, torch.float32)
        assert kernels.description() == "torch kernels (turned off)"
    assert layer.tiled is None
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ form.dequantize().T, rtol=1e-5, atol=1e-5)


def test_without_a_compiler_quantized_weights_still_run(monkeypatch, tmp_path):
    """A machine without a C++ compiler: the reason is given and nothing is half-written in the cache."""
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    reason = kernels.load.__wrapped__()
    assert reason is not None and "no-such-compiler" in reason
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob(".building-*"))


def test_builds_started_together_compile_once(monkeypatch, tmp_path):
    """Processes started together on a fresh machine (accelerate, torchrun) or threads: one compiles, the others
    wait for its library (a stand-in compiler that records its calls and takes a moment)."""
    import stat
    import threading

    calls = tmp_path / "calls.txt"
    compiler = tmp_path / "c++"
    compiler.write_text(f"""#!/bin/sh
[ "$1" = "--version" ] && {{ echo stand-in 1.0; exit 0; }}
echo "$@" >> {calls}
sleep 0.5
while [ $# -gt 0 ]; do [ "$1" = "-o" ] && : > "$2"; shift; done
""")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("D3_CACHE_DIR", str(tmp_path / "cache"))
    built = []
    threads = [threading.Thread(target=lambda: built.append(kernels._built(str(compiler)))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 3 and len(set(built)) == 1 and built[0].is_file()
    assert len(calls.read_text().splitlines()) == len(kernels.SOURCES) + 1  # each source once, one link


def test_argmax_picks_what_torch_picks_ties_nans_and_infinities_included():
    generator = torch.Generator().manual_seed(4)
    for vocab in (1, 7, 8, 9, 49152, 100003):
        for trial in range(12):
            logits = torch.randn(3, vocab, generator=generator)
            if trial % 3 == 0:
                logits[0, torch.randint(0, vocab, (1,), generator=generator)] = logits[0].max()  # a tie
            if trial % 4 == 0:
                logits[1, torch.randint(0, vocab, (1,), generator=generator)] = float("nan")
            if trial % 5 == 0:
                logits[2] = float("-inf")
            assert torch.equal(torch.ops.d3.argmax(logits), logits.argmax(-1))


@pytest.mark.skipif(not kernels.available() or torch.ops.d3.instruction_set() == "avx2",
                    reason="the AVX2 path is the native one here")
def test_the_avx2_path_passes_these_tests_too(request):
    """The tests above exercise the path this CPU builds; the AVX2 one (x86-64 machines without AVX-512) is built
    and tested in a subprocess, so both instruction sets are covered wherever the suite runs (built once per
    checkout, in pytest's cache like the rest)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, "D3_KERNELS_MARCH": "haswell"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", str(Path(__file__)), "tests/core/model/test_native_layer.py", "tests/core/decode/test_native_step.py",
                             "tests/core/model/test_gguf_tiles.py",
                             "-k", "not avx2_path", "-n", "0", "-o", f"cache_dir={request.config.getini('cache_dir')}"],
                            env=environment, cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout
