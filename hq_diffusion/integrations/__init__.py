"""diffusers integration: ``quantize`` / ``summary``, presets, save/load, the diffusers quantizer backend, the
K/V attention processors and the model-family registry.

The public functions are :mod:`.api`'s (the one place that attaches the diffusers quantizer): use them as
``hq_diffusion.quantize`` / ``hq_diffusion.load_quantized``; ``hq_diffusion.integrations.quantize`` is the
core *module*. The quantized-model state shared by quantize, serialization and the backend lives in
:mod:`.state`. Names are imported on first use, so that the torch-free model-family registry
(:mod:`.families`) imports without torch. See docs/ARCHITECTURE.md.
"""
import importlib

_EXPORTS = {
    "HQConfig": ".config", "QuantSummary": ".quantize", "summary": ".api",
    "load_quantized": ".api", "save_quantized": ".api",
}
__all__ = ["HQConfig", "QuantSummary", "summary", "save_quantized", "load_quantized"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
