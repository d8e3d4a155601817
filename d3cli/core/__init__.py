"""The core: loading a model, the depth schedule, skipping layers (and bridging them), the KV cache, the decoding
engine, prompts, sampling, settings and a model's calibration. Imports nothing of evaluation or cli."""
