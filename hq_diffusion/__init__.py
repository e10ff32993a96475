"""hq-diffusion: HyperQuant quantization (RHT + lattice + rANS or Rice coding) for diffusers DiT pipelines.

```python
pipe = hq_diffusion.quantize(LTXPipeline.from_pretrained(path), bps=4.0)
print(hq_diffusion.summary(pipe))
hq_diffusion.save_quantized(pipe, "ltx-hq4")
pipe = hq_diffusion.load_quantized("ltx-hq4")
```

The public names are imported on first use, so ``import hq_diffusion`` does not import diffusers;
``hq_diffusion.codec`` needs torch only. Importing it registers the ``hq_diffusion`` quantization backend with
diffusers as soon as diffusers is imported (:mod:`hq_diffusion.integrations.autoregister`), so that
``import hq_diffusion`` alone lets ``DiffusionPipeline.from_pretrained`` load a saved quantized pipeline.
"""
from __future__ import annotations

import importlib

from .integrations import autoregister as _autoregister

__version__ = "0.1.0"
__all__ = ["quantize", "summary", "save_quantized", "load_quantized", "HQConfig", "__version__"]

_LAZY = {
    "quantize": "hq_diffusion.integrations.api",
    "summary": "hq_diffusion.integrations.api",
    "save_quantized": "hq_diffusion.integrations.api",
    "load_quantized": "hq_diffusion.integrations.api",
    "HQConfig": "hq_diffusion.integrations.config",
}


_autoregister.install()


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hq_diffusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
