"""Register hq-diffusion with diffusers (and transformers) when they are imported, without importing them.

diffusers has no plugin registry or entry point for quantization backends: its loaders consult module-level
dicts (``diffusers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` / ``AUTO_QUANTIZATION_CONFIG_MAPPING``) and
``PipelineQuantizationConfig`` also consults transformers' ``AUTO_QUANTIZATION_CONFIG_MAPPING``. So
``import hq_diffusion`` calls :func:`install`: for each module that the backend extends, if it is already
imported the backend registers now, otherwise a ``sys.meta_path`` finder waits for that module and registers
right after it has executed (:func:`~hq_diffusion.integrations.diffusers_backend.register`, idempotent). Then
``import hq_diffusion; LTXPipeline.from_pretrained(saved_quantized_dir)`` works, and importing hq_diffusion still
imports neither diffusers nor torch.

This module is torch-free and diffusers-free. The supported diffusers range is :data:`DIFFUSERS_RANGE`; outside it
:func:`check_diffusers_version` raises a one-line ``ImportError`` when the backend registers.
"""
from __future__ import annotations

import importlib
import importlib.abc
import re
import sys
import threading

#: diffusers versions the backend is written against: ``(lowest, first unsupported)`` (pyproject pins the same).
DIFFUSERS_RANGE = ((0, 42), (0, 43))

BACKEND = "hq_diffusion.integrations.diffusers_backend"
#: the modules whose loading triggers a (re-)registration
WATCHED = ("diffusers.quantizers.auto", "diffusers.models.modeling_utils", "diffusers.pipelines.pipeline_utils",
           "transformers.quantizers.auto")
#: LoRA on quantized layers (:mod:`~hq_diffusion.integrations.lora`): registered once peft's LoRA package has loaded
LORA = "hq_diffusion.integrations.lora"
LORA_WATCHED = ("peft.tuners.lora", "diffusers.loaders.peft")

_lock = threading.RLock()


def _version_tuple(version: str) -> tuple[int, ...]:
    nums = []
    for part in version.split(".")[:3]:
        m = re.match(r"\d+", part)
        nums.append(int(m.group()) if m else 0)
    return tuple(nums)


def check_diffusers_version(version: str) -> None:
    """Raise ``ImportError`` (one line) when diffusers ``version`` (a string such as ``"0.42.1"``) is outside
    :data:`DIFFUSERS_RANGE`."""
    lo, hi = DIFFUSERS_RANGE
    if not lo <= _version_tuple(version)[:2] < hi:
        spec = f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}"
        raise ImportError(f"hq_diffusion supports diffusers {spec}, found diffusers {version}: "
                          f"pip install 'diffusers{spec}'")


def _register() -> None:
    """Register the backend, once diffusers' quantizer mappings exist (transformers alone imports nothing)."""
    if "diffusers.quantizers.auto" not in sys.modules:
        return
    backend = sys.modules.get(BACKEND)
    if backend is not None and not hasattr(backend, "register"):
        return  # the backend is being imported (it imported diffusers): it registers at its end
    importlib.import_module(BACKEND).register()


def _register_lora() -> None:
    """Register the peft LoRA layer for HQLinear, once peft's LoRA package has fully loaded."""
    if "peft.tuners.lora" in sys.modules and hasattr(sys.modules["peft.tuners.lora"], "LoraModel"):
        importlib.import_module(LORA).register()


class _Loader(importlib.abc.Loader):
    """Runs the original loader, then registers the backend."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if module.__name__ in LORA_WATCHED:
            _register_lora()
        else:
            _register()

    def __getattr__(self, name):  # get_source, get_resource_reader, ... of the original loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that wraps the loader of the :data:`WATCHED` modules."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in WATCHED and fullname not in LORA_WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def install() -> None:
    """Register now for each already imported :data:`WATCHED` module, and watch for the others (idempotent)."""
    with _lock:
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    if any(name in sys.modules for name in WATCHED):
        _register()
    if any(name in sys.modules for name in LORA_WATCHED):
        _register_lora()


def uninstall() -> None:
    """Stop watching imports (the registrations already made stay)."""
    with _lock:
        while _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
