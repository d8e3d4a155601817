"""A random-weight model of Qwen2.5-0.5B's shape (the timing stand-in for a 0.5B model: no such model can be
downloaded here), with the embedded model's tokenizer (ids it does not know decode to nothing).

    .venv/bin/python docs/measurements/calibrate/qwen05_shape.py /tmp/q05   # then run.sh times d3 calibrate on it
"""
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from d3cli.core.model.loader import load

out = sys.argv[1]
config = Qwen2Config(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                     rope_theta=1000000.0, rms_norm_eps=1e-6)
torch.manual_seed(0)
model = Qwen2ForCausalLM(config)
model.save_pretrained(out)
load(None, device="cpu", dtype="float32").tokenizer.save_pretrained(out)
print(sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
