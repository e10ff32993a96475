"""Quantized building blocks for diffusers transformers (``linear``: HQLinear; ``kv``: K/V attention processors)."""
