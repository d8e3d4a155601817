"""The choices of the model options, defined once: the CLI's enums are made from these lists and `ModelOptions`
checks a value against them when it is built (no other place checks them again). What each choice runs as is said
here once too (DTYPE_HELP, WEIGHTS_HELP): `--help`, the completions and the lm-eval model's docs show these
sentences, and the code that picks (loader.resolve_dtype, weight_choice.quantized_dtype) points here. Importing this
module imports nothing else, so the CLI can build its options without loading torch."""

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto",)
WEIGHT_KINDS = ("auto", "float32", "bfloat16", "float16", "int8", "int4")  # weights.py says what each runs as

DTYPE_HELP = ("Compute dtype (the activations): auto is float32 on the CPU, with any weights (d3's kernels take float32 "
              "activations; int8/int4 on torch's own kernels run in bfloat16), bfloat16 on a GPU (or float16).")
WEIGHTS_HELP = ("How the weights are stored and run: auto runs a GGUF file in its own precision on the CPU (Q4 as "
                "int4, Q8 as int8) and other models dense; int8/int4 quantize on load (CPU only); "
                "float32/bfloat16/float16 dense.")
