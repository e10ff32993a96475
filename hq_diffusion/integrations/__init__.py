"""diffusers integration: ``quantize`` / ``summary``, presets, save/load, and the diffusers quantizer backend."""
from .config import HQConfig
from .quantize import QuantSummary, quantize, summary
from .serialization import load_quantized, save_quantized

__all__ = ["HQConfig", "QuantSummary", "quantize", "summary", "save_quantized", "load_quantized"]
