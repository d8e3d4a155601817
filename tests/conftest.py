"""Shared fixtures: the embedded model (converted once per session), tiny random-weight models, a CLI runner.

Tests never touch the real user cache or config: D3_CACHE_DIR points at pytest's own cache folder (so the embedded
GGUF is converted once per checkout, not once per run), and HOME/XDG folders at temporary ones.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("D3_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


ISOLATED = ("D3_CACHE_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE")
_saved_environment: dict[str, str | None] = {}


def pytest_configure(config):
    """Before collection (test modules ask at import whether d3's kernels build, which builds them): d3's cache in
    pytest's cache folder, the user's home folders in a temporary one, no hub."""
    _saved_environment.update({key: os.environ.get(key) for key in ISOLATED})
    os.environ["D3_CACHE_DIR"] = str(config.cache.mkdir("d3-cache"))
    shutil.rmtree(Path(os.environ["D3_CACHE_DIR"]) / "calibrations", ignore_errors=True)  # none from earlier runs
    home = Path(tempfile.mkdtemp(prefix="d3-tests-home-"))
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    os.environ["XDG_CONFIG_HOME"] = str(home / "config")
    os.environ["XDG_CACHE_HOME"] = str(home / "cache")
    os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach for the internet
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The suite runs in one worker per core (pytest-xdist, `-n auto` in pyproject.toml): each worker, and every
        # process it starts, computes on one thread. Two threads per worker on two cores made the suite three
        # times slower (OpenMP's threads spin while they wait for a core); kernel tests ask for two (thread_team).
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core this process may use, at most four (each holds its own models)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores)


def pytest_unconfigure(config):
    for key, value in _saved_environment.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def thread_team():
    """d3's kernels split their work across torch's threads and meet at barriers: their tests run on two threads,
    so the splitting is exercised even in a test worker that computes on one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def own_calibrations_folder(tmp_path, monkeypatch):
    """Calibrations a test makes stay in that test (the GGUF conversion cache is shared, calibrations are not)."""
    import d3cli.core.calibration.model_calibration

    monkeypatch.setattr(d3cli.core.calibration.model_calibration, "calibrations_dir", lambda: tmp_path / "calibrations")


@pytest.fixture(autouse=True)
def clean_working_directory(tmp_path, monkeypatch):
    """Each test runs in an empty folder with no D3_* settings, so no d3.toml or variable of the developer's leaks in."""
    monkeypatch.chdir(tmp_path)
    for variable in list(os.environ):
        if variable.startswith("D3_") and variable != "D3_CACHE_DIR":
            monkeypatch.delenv(variable)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark data beside the checkout (../shared/data), as CI has it."""
    if not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"no benchmark data in {SHARED_DATA} (set D3_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct, loaded through the product's own loader."""
    from d3cli.core.model.loader import load

    return load(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer alone, as the loader reads it (the tiny models share its vocabulary): no model
    weights are loaded, so tests of tiny models stay out of the `embedded` marker."""
    from transformers import AutoTokenizer

    from d3cli.core.model.gguf_cache import cached_gguf_dir
    from d3cli.core.model.loader import embedded_gguf_path

    return AutoTokenizer.from_pretrained(cached_gguf_dir(embedded_gguf_path()), local_files_only=True)


def pytest_collection_modifyitems(items):
    """Every test that loads the embedded model in this process is marked `embedded` (tests that run it in a child
    process carry the mark themselves), so `pytest -m "not embedded"` is the fast loop."""
    for item in items:
        if "embedded" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.embedded)


TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def tiny_config(family: str, vocab_size: int, num_layers: int = 8, window: int = 6):
    """A small config of each supported layout; sliding windows small enough to be exceeded in the tests."""
    import transformers

    common = dict(TINY_SIZES, vocab_size=vocab_size, num_hidden_layers=num_layers, max_position_embeddings=512,
                  initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=window)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=window, max_window_layers=3)
    if family == "qwen3":
        return transformers.Qwen3Config(**common)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, sliding_window=window)
    if family == "gemma3":  # layers 0-4 sliding, 5 full, 6-7 sliding: the first full-attention layer is a flex layer
        return transformers.Gemma3TextConfig(**common, sliding_window=window)
    if family == "phi3":
        common.pop("head_dim")
        return transformers.Phi3Config(**common, sliding_window=window)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
SLIDING_FAMILIES = ["mistral", "qwen2", "gemma2", "gemma3", "phi3"]


def build_tiny_model(family: str, vocab_size: int, num_layers: int = 8, seed: int = 0, window: int = 6):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size, num_layers, window)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tokenizer):
    """family -> tiny random-weight model sharing the embedded tokenizer's vocabulary."""
    return {family: build_tiny_model(family, len(tokenizer)) for family in FAMILIES}


# The same tiny models as the loader prepares them: fused decoder layers (float32), and int8 / int4 weights with
# float32 activations, on d3's kernels (where they can be built) or on torch's (`kernels="torch"`: float activations,
# so products equal the dequantized weights' to float32 rounding).
WEIGHT_VARIANTS = {"fused": "float32", "int8": "int8", "int4": "int4"}


@pytest.fixture(scope="session")
def tiny_variant_models(tiny_models):
    """(family, variant, kernels="d3") -> a copy of the tiny model with the weights of `variant` (WEIGHT_VARIANTS)
    on those kernels, built once."""
    import contextlib
    import copy

    from d3cli import kernels as d3_kernels
    from d3cli.core.model.weight_choice import WeightChoice
    from d3cli.core.model.weights import apply_weights

    built = {}

    def get(family: str, variant: str, kernels: str = "d3"):
        if (family, variant, kernels) not in built:
            model = copy.deepcopy(tiny_models[family])
            with d3_kernels.turned_off() if kernels == "torch" else contextlib.nullcontext():
                apply_weights(model, WeightChoice(WEIGHT_VARIANTS[variant], torch.float32))
            built[(family, variant, kernels)] = model.eval()
        return built[(family, variant, kernels)]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved as a Hugging Face folder with the embedded tokenizer: `--model DIR` loads it instantly."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def assert_user_error(self, message: str = "", nothing_printed: bool = False) -> None:
        """A user mistake as d3 reports it: exit 2, one line `d3: error: ...` on stderr that says `message`; with
        `nothing_printed`, nothing on stdout either."""
        assert self.exit_code == 2, self.stderr
        assert self.stderr.startswith("d3: error: ") and self.stderr.count("\n") == 1, self.stderr
        assert message in self.stderr, self.stderr
        assert not nothing_printed or self.stdout == "", self.stdout


def invoke(args: list[str], stdin: bytes = b"") -> CliResult:
    """Run `d3 ARGS` in this process with stdin/stdout/stderr replaced (none is a terminal)."""
    from d3cli.cli.app import run

    out, err = io.BytesIO(), io.BytesIO()
    streams = (
        io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"),
        io.TextIOWrapper(out, encoding="utf-8", write_through=True),
        io.TextIOWrapper(err, encoding="utf-8", write_through=True),
    )
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = streams
    try:
        code = run(args)
        for stream in streams:
            stream.flush()
        result = CliResult(code, out.getvalue().decode("utf-8"), err.getvalue().decode("utf-8"))
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        for stream in streams:
            stream.detach()
    return result


@pytest.fixture
def cli():
    return invoke


def d3_executable() -> str:
    """The installed console script beside this interpreter."""
    candidate = Path(sys.executable).with_name("d3")
    return str(candidate) if candidate.exists() else "d3"


def default_ctrl_c() -> None:
    """Run in a spawned child before exec: Ctrl-C back to its default action. A test runner started with SIGINT ignored
    (a background job, nohup) would otherwise pass the ignored signal on, and the spawned d3 would never see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def mixed_gguf(tmp_path_factory):
    """A two-layer GGUF file with one layer of every kind d3 meets (tests/gguf_files.py's MIXED)."""
    from gguf_files import MIXED, write_tiny_gguf

    from d3cli.core.model.loader import embedded_gguf_path

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", embedded_gguf_path(), MIXED)


@pytest.fixture(scope="session")
def exact_gguf(tmp_path_factory):
    """A two-layer GGUF file whose every linear layer has an exact block form, and an LM head of its own (EXACT)."""
    from gguf_files import EXACT, write_tiny_gguf

    from d3cli.core.model.loader import embedded_gguf_path

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "exact.gguf", embedded_gguf_path(), EXACT, tied=False)
