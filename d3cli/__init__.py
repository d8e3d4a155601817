"""d3: training-free layer skipping for Hugging Face causal language models (Position-Aware Depth Decay Decoding)."""

__version__ = "0.1.0"
