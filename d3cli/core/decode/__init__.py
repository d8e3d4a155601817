"""Decoding with D3: which layers run at each step, and the loop that runs them.

    schedule.py      k_i = floor(L·α^i), clamped, and the nested layer sets: the one schedule
    skipping.py      the one place layers stop running (stand-ins in the model's layer list)
    bridges.py       what stands in for a skipped run of layers, and its fit
    kv_cache.py      a transformers model's cache that tolerates skipped layers
    sampling.py      greedy, temperature, top-k, top-p
    native_step.py   a decode step of a model whose layers all run on d3's kernels
    engine.py        prefill, decode_one_token -> generate_steps -> stream_generate (one TokenEvent per token)
                     -> generate; stream_decode / decode: the entry of every command
    results.py       replies gathered from the events, and their JSON records
"""
