"""diffusers integration: ``quantize`` / ``summary``, presets, save/load, and the diffusers quantizer backend.

The public names are imported on first use, so that torch-free modules of this package (the model-family
registry :mod:`.families`) can be imported without torch.
"""
import importlib

_EXPORTS = {
    "HQConfig": ".config", "QuantSummary": ".quantize", "quantize": ".quantize", "summary": ".quantize",
    "load_quantized": ".serialization", "save_quantized": ".serialization",
}
__all__ = ["HQConfig", "QuantSummary", "quantize", "summary", "save_quantized", "load_quantized"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
