"""The measurements behind docs/PERFORMANCE.md that `d3 bench --task speed` does not make, on the embedded model.

    python docs/measurements/speed/cpu_experiments.py profile         # torch profiler over 20 decode steps
    python docs/measurements/speed/cpu_experiments.py fixed           # a step with no layers; the LM head alone
    python docs/measurements/speed/cpu_experiments.py knobs           # dtype x threads, inference_mode vs no_grad
    python docs/measurements/speed/cpu_experiments.py cache 64 512 1024 2048   # concatenating vs growing cache
    python docs/measurements/speed/cpu_experiments.py compile layers  # or: compile model
    python docs/measurements/speed/cpu_experiments.py startup         # phases of a warm start (run it twice)
    python docs/measurements/speed/cpu_experiments.py floor           # a step's parts vs llama.cpp's whole step

Variants compared in one process take turns step by step, so a drift in machine speed hits them alike; each figure
is a median decode-step time (ms) at full depth, batch 1, after ~100 prompt tokens. Imports happen inside each
experiment so that `startup` times them from a fresh interpreter.
"""

from __future__ import annotations

import statistics
import sys
import time

PROMPT_TOKENS = 100


def _decoder(model, grad_mode=None, prompt_tokens: int = PROMPT_TOKENS, concatenating: bool = False):
    """A closure that feeds one token per call into its own cache and returns the step's seconds. `concatenating`:
    transformers' own cache layers (a copy of every cached position per step), as before d3's growing layers."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from d3cli.core.decode.engine import cache_argument
    from d3cli.core.decode.kv_cache import DepthDecayCache

    grad_mode = grad_mode or torch.inference_mode
    cache = DepthDecayCache(config=model.config)
    if concatenating:
        cache.layers = [DynamicLayer() for _ in cache.layers]
    prompt = torch.randint(100, 20000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with grad_mode():
        model(input_ids=prompt, **cache_argument(model, cache), use_cache=True)
    position = [prompt_tokens]

    def step() -> float:
        started = time.perf_counter()
        with grad_mode():
            model(input_ids=torch.tensor([[42]]), position_ids=torch.tensor([[position[0]]]),
                  **cache_argument(model, cache), use_cache=True)
        position[0] += 1
        return time.perf_counter() - started

    return step


def _medians_in_turns(steppers: dict, steps: int, before_each=None) -> dict:
    seconds = {name: [] for name in steppers}
    for index in range(steps):
        order = list(steppers.items()) if index % 2 == 0 else list(steppers.items())[::-1]
        for name, step in order:
            if before_each:
                before_each(name)
            seconds[name].append(step())
    return {name: round(1000 * statistics.median(values[5:]), 2) for name, values in seconds.items()}


def profile() -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from d3cli.core.model.loader import load

    step = _decoder(load(None).model)
    for _ in range(10):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(20):
            step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def fixed() -> None:
    """What a step costs with every decoder layer skipped (T_fixed measured, not fitted), how much of it is the LM
    head's matrix-vector product, and the memory bandwidth that product streams at."""
    import torch

    from d3cli.core.decode.skipping import LayerSkipper
    from d3cli.core.model.loader import load

    model = load(None).model
    full, none = _decoder(model), _decoder(model)
    head = model.get_output_embeddings().weight
    hidden = torch.randn(1, head.shape[1], dtype=head.dtype)

    def head_only() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            torch.nn.functional.linear(hidden, head)
        return time.perf_counter() - started

    with LayerSkipper(model) as skipper:
        def no_layers() -> float:
            skipper.keep([])
            seconds = none()
            skipper.restore()
            return seconds

        medians = _medians_in_turns({"all layers": full, "no layers": no_layers, "LM head alone": head_only}, 60)
    print(medians)
    head_bytes = head.numel() * head.element_size()
    print(f"LM head {head_bytes / 1e6:.0f} MB in {medians['LM head alone']} ms: "
          f"{head_bytes / medians['LM head alone'] / 1e6:.1f} GB/s")


def knobs() -> None:
    import torch

    from d3cli.core.model.loader import load

    models = {dtype: load(None, dtype=dtype).model for dtype in ("float32", "bfloat16", "float16")}
    steppers = {(dtype, threads): _decoder(model) for dtype, model in models.items() for threads in (1, 2)}
    medians = _medians_in_turns(steppers, 40, before_each=lambda name: torch.set_num_threads(name[1]))
    for (dtype, threads), ms in medians.items():
        print(f"{dtype:9s} {threads} thread(s): {ms} ms")
    torch.set_num_threads(2)
    modes = {"inference_mode": _decoder(models["float32"], torch.inference_mode),
             "no_grad": _decoder(models["float32"], torch.no_grad)}
    print(_medians_in_turns(modes, 40))


def cache(lengths: list[int]) -> None:
    from d3cli.core.model.loader import load

    model = load(None).model
    for length in lengths:
        steppers = {"concatenate": _decoder(model, prompt_tokens=length, concatenating=True),
                    "grow in place": _decoder(model, prompt_tokens=length)}
        print(length, _medians_in_turns(steppers, 100))


def compile_(what: str) -> None:
    import torch

    from d3cli.core.model.loader import load

    model = load(None).model
    eager = statistics.median(_run(_decoder(model), 60)[10:])
    started = time.perf_counter()
    if what == "layers":
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    else:
        model.forward = torch.compile(model.forward, dynamic=True)
    step = _decoder(model)
    _run(step, 10)
    print(f"compile and first steps: {time.perf_counter() - started:.1f} s")
    compiled = statistics.median(_run(step, 60)[10:])
    print(f"eager {1000 * eager:.1f} ms, compiled ({what}) {1000 * compiled:.1f} ms")


def floor() -> None:
    """Where a decode step of the default weights goes, against llama.cpp's whole step on the same file (llama-cpp-
    python, when installed), in turns: d3's step as the engine takes it (native.NativeDecoder.step), its 30 layers in
    the one kernel call the step makes, the LM head alone, and the rest (embedding, rotary tables, final norm,
    Python) as the difference."""
    import torch
    from d3cli.core.native import native_decoder

    from d3cli.core.decode.engine import make_prompt_batch, prefill
    from d3cli.core.decode.kv_cache import DepthDecayCache
    from d3cli.core.model.loader import embedded_gguf_path, load

    loaded = load(None)
    model = loaded.model
    native = native_decoder(model)
    cache = DepthDecayCache(config=model.config)
    batch = make_prompt_batch([list(range(100, 100 + PROMPT_TOKENS))], 0, "cpu")
    with torch.inference_mode():
        prefill(model, batch, cache)
    position = [PROMPT_TOKENS]

    def whole_step() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            native.step(torch.tensor([[42]]), torch.tensor([[position[0]]]), cache)
        position[0] += 1
        return time.perf_counter() - started

    layers = [layer.native for layer in native.layers]
    buffers = [torch.randn(1, layer.layer.num_key_value_heads, 4 * PROMPT_TOKENS, layer.layer.head_dim).half()
               for layer in layers for _ in range(2)]
    hidden = torch.randn(1, 1, model.config.hidden_size)
    cos, sin = (part.contiguous() for part in native.rotary(hidden, torch.tensor([[PROMPT_TOKENS]])))

    def layers_alone() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            torch.ops.d3.decoder_layers(hidden, buffers[0::2], buffers[1::2], [PROMPT_TOKENS] * len(layers), cos,
                                        sin, [layer.weights for layer in layers])
        return time.perf_counter() - started

    head = model.get_output_embeddings()

    def head_alone() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            head(hidden)
        return time.perf_counter() - started

    steppers = {"whole step": whole_step, "30 layers in one call": layers_alone, "LM head alone": head_alone}
    try:
        from d3cli.evaluation.speed.side_by_side import LlamaCpp

        llama = LlamaCpp(str(embedded_gguf_path()), torch.get_num_threads(), 4096)
        llama.decode_seconds(list(range(100, 100 + PROMPT_TOKENS)), 2)

        def llama_step() -> float:
            return _llama_one(llama)

        steppers["llama.cpp step"] = llama_step
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp not timed")
    print(loaded.weights.label())
    medians = _medians_in_turns(steppers, 200)
    medians["the rest (embedding, rotary, norm, Python)"] = round(
        medians["whole step"] - medians["30 layers in one call"] - medians["LM head alone"], 2)
    print(medians)


def _llama_one(llama) -> float:
    import numpy as np

    model = llama.model
    token = int(np.argmax(model.scores[model.n_tokens - 1]))
    started = time.perf_counter()
    model.eval([token])
    return time.perf_counter() - started


def _run(step, count: int) -> list[float]:
    return [step() for _ in range(count)]


def startup() -> None:
    started = last = time.perf_counter()

    def mark(label: str) -> None:
        nonlocal last
        now = time.perf_counter()
        print(f"{label:30s} {now - last:5.2f} s (total {now - started:5.2f} s)")
        last = now

    import torch
    mark("import torch")
    import transformers
    assert transformers.LlamaForCausalLM  # the model class's modules, as loading the model imports them
    mark("import transformers + Llama")
    import d3cli.cli.app
    from d3cli.core.model import loader
    assert d3cli.cli.app
    mark("import d3cli")
    from d3cli.core.model import gguf_cache
    from d3cli.core.model.weight_choice import resolve_weights

    folder = gguf_cache.cached_gguf_dir(loader.embedded_gguf_path())
    mark("sha256 + cache lookup")
    choice = resolve_weights("auto", "auto", torch.device("cpu"), gguf_types=gguf_cache.gguf_types(folder),
                             device_map=None, group_size=32, default_dtype=loader.resolve_dtype)
    model, tokenizer, _ = gguf_cache.load_cached(folder, choice, "cpu")
    mark("model + tokenizer (blocks)")
    with torch.inference_mode():
        model(torch.tensor([tokenizer("Hello")["input_ids"]]))
    mark("first forward")


if __name__ == "__main__":
    experiment, *rest = sys.argv[1:] or ["profile"]
    if experiment == "cache":
        cache([int(value) for value in rest] or [64, 512, 1024, 2048])
    elif experiment == "compile":
        compile_(rest[0] if rest else "layers")
    else:
        {"profile": profile, "fixed": fixed, "knobs": knobs, "startup": startup, "floor": floor}[experiment]()
