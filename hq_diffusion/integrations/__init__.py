"""diffusers integration: ``quantize`` / ``summary``, presets, save/load, and the diffusers quantizer backend.

Public names come from :mod:`.api` (the one place that attaches the diffusers quantizer); the quantized-model
state shared by quantize, serialization and the backend lives in :mod:`.state`.
"""
from .api import load_quantized, quantize, save_quantized, summary
from .config import HQConfig
from .quantize import QuantSummary

__all__ = ["HQConfig", "QuantSummary", "quantize", "summary", "save_quantized", "load_quantized"]
