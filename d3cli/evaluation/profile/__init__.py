"""`d3 profile-ppl`: how D3 changes the model's per-position loss on a corpus, and which layers matter.

    corpus.py       the texts: reference answers, the model's own continuations, or a user's file
    perplexity.py   NLL buckets by position and a power-law fit of them
    layers.py       the measurements over the texts: per-position NLL under each schedule, the layer profile
    recommend.py    the α and floor that reach a target speedup at the least NLL cost, checked by decoding
    run.py          the command's one call: texts, measurements, recommendation, as one JSON-ready result
    files.py        its CSV and plot files
"""
