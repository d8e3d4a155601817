"""The core: what decoding a model with D3 takes, in five packages, each importing only those above it here:

    text          prompts from the shell, detokenizing, d3's own tokenizer
    model         the one loader (GGUF files, folders, hub ids), weights and their kinds, fused and native layers,
                  d3's own model, the facts read off a loaded model
    decode        the depth schedule, skipping layers, the KV caches, the engine that yields one event per token
    calibration   layer profiles and a model's calibration file
    session       settings, the DecodePlan that binds them to a model, conversations, batches of prompts

It imports nothing of evaluation, server or cli (tests/test_layers.py).
"""
