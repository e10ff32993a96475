"""The public entry points of :mod:`hq_diffusion.integrations`, and the one place that attaches the diffusers
quantizer.

``quantize`` and ``load_quantized`` are :func:`.quantize.quantize` and :func:`.serialization.load_quantized`
followed by :func:`attach_to_diffusers`: every quantized diffusers ``ModelMixin`` they return carries the
``hf_quantizer`` and ``config.quantization_config`` of :mod:`.diffusers_backend`, so that diffusers' own
``save_pretrained`` writes a loadable hq-diffusion checkpoint. ``summary`` and ``save_quantized`` are re-exported
unchanged. Import order inside the package (no cycle): config ← state ← quantize ← diffusers_backend ← api, and
state ← serialization ← api. See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import functools
import importlib
import sys

from torch import nn

from . import quantize as _quantize
from . import serialization as _serialization
from .quantize import summary
from .serialization import save_quantized
from .state import STATE_ATTR


def attach_to_diffusers(obj):
    """Attach the diffusers quantizer to ``obj`` (a module) or to each component of ``obj`` (a pipeline) that is a
    quantized diffusers ``ModelMixin``; other modules are left alone. A no-op while diffusers is not imported
    (a model of diffusers cannot exist then). Returns ``obj``."""
    diffusers = sys.modules.get("diffusers")
    if diffusers is None:
        return obj
    if isinstance(obj, nn.Module):
        modules = [obj]
    else:
        modules = [c for c in (getattr(obj, "components", None) or {}).values() if isinstance(c, nn.Module)]
    for mod in modules:
        if isinstance(mod, diffusers.ModelMixin) and getattr(mod, STATE_ATTR, None) is not None:
            importlib.import_module("hq_diffusion.integrations.diffusers_backend").attach_quantizer(mod)
    return obj


@functools.wraps(_quantize.quantize)
def quantize(obj, *args, **kwargs):
    return attach_to_diffusers(_quantize.quantize(obj, *args, **kwargs))


@functools.wraps(_serialization.load_quantized)
def load_quantized(directory, *args, **kwargs):
    return attach_to_diffusers(_serialization.load_quantized(directory, *args, **kwargs))


__all__ = ["quantize", "summary", "save_quantized", "load_quantized", "attach_to_diffusers"]
