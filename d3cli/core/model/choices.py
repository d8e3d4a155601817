"""The choices of the model options, defined once: the CLI's enums are made from these lists and `ModelOptions`
checks a value against them when it is built (no other place checks them again). Importing this module imports
nothing else, so the CLI can build its options without loading torch."""

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto",)
WEIGHT_KINDS = ("auto", "float32", "bfloat16", "float16", "int8", "int4")  # weights.py says what each runs as
