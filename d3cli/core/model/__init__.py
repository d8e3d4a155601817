"""A loaded model: `loader.load(ModelOptions) -> LoadedModel(model, tokenizer, name, weights, load_s)`.

    loader.py          the one loader: a GGUF file, a model folder or a hub id, on the chosen device and weights
    memory.py          whether a model fits, and the kind `--weights auto` picks
    gguf_cache.py      a GGUF header's config and tokenizer, converted once
    gguf_blocks.py     a GGUF file's header and blocks;  gguf_tiles.py  its blocks packed into the kernels' tiles
    gguf_weights.py    a GGUF file's tensors read from the file, tensor by tensor (no float copy)
    tile_cache.py      packed tiles kept in d3's cache for later starts
    streamed.py        an empty model filled from a weight source (safetensors shards too)
    choices.py         the model options' choices, defined once
    weight_choice.py   the `--weights` kinds, what `auto` picks, and the report of what ran
    weights.py         a choice put into a model, layer by layer;  quantized.py  the quantized linear layers
    embeddings.py      embedding tables kept quantized
    fused_layers.py    a Llama-family layer in fewer calls;  native_layer.py  that layer as one kernel call
    d3_record.py       what a transformers start made of a GGUF file, for lean starts
    d3_model.py        d3's own Llama-family model;  kv_buffers.py  its KV cache (buffers that grow in place)
    model_facts.py     what d3 reads off a loaded model: layers, their count, context, device, dtype
"""
