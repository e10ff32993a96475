"""Loading the Triton kernel modules (``hq_diffusion.kernels.<name>``), which import Triton.

Used by :mod:`.dispatch` (the one place that chooses Triton or the torch reference) and by :mod:`.ops` (the
``torch.library`` registrations); it imports neither, so the two do not import each other.
"""
from __future__ import annotations

import importlib
import sys


def kernel_module(name: str):
    """The kernel module ``hq_diffusion.kernels.<name>`` (imports Triton). Raises RuntimeError when the kernels
    were loaded with ``TRITON_INTERPRET`` set differently from now (Triton fixes compiled or interpreted at its
    first import: set the variable once, before that)."""
    pkg = __name__.rsplit(".", 1)[0]
    mod = importlib.import_module(f"{pkg}.{name}")
    jit = sys.modules[f"{pkg}._jit"]
    if jit.interpreting() != jit.LOADED_INTERPRETED:
        raise RuntimeError(f"the kernels were loaded {'for' if jit.LOADED_INTERPRETED else 'without'} Triton's "
                           f"interpreter but TRITON_INTERPRET is now {'off' if jit.LOADED_INTERPRETED else 'on'}; "
                           f"set it once, before Triton is imported")
    return mod
