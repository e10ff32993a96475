"""Evaluation of quantized pipelines: ``metrics`` (per-frame PSNR / SSIM / LPIPS / flicker, audio SNR),
``report`` (npz / mp4 / JSON / CSV / HTML writers) and ``runner`` (``hq-diffusion eval``).

Submodules load on first access, so importing ``hq_diffusion.eval`` costs nothing.
"""

import importlib

__all__ = ["metrics", "report", "runner"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
