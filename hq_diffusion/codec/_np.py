"""Internal numpy helpers for the CPU paths of the codec (lattice search, stripping, Rice coding).

The codec's public API takes and returns torch tensors. Integer and small-axis work is much faster in
numpy on CPU (vectorized shifts, ``unpackbits``, ``flatnonzero``, cache-friendly chunked loops), so the
hot paths convert with :func:`to_numpy` (zero copy for a contiguous CPU tensor), compute in numpy and
wrap the result with :func:`to_torch` (zero copy), moving to and from the tensor's device around it.

Implementation choice: :func:`select` is the one place where the codec looks at a device. Every public
function of ``lattice``, ``strip`` and ``rice`` that has a numpy and a torch implementation asks it which to
run; both produce bit-identical results, so the choice is about speed only, never about what is computed.
"""
from __future__ import annotations

import numpy as np
import torch

# Vectors per chunk in the chunked loops: small enough that a chunk's temporaries (a few (dim, CHUNK)
# float32 arrays) stay in the L2 cache, large enough that numpy's per-call overhead is amortized.
CHUNK = 8192


#: The CPU implementation of the codec steps that have a compiled one (the rANS coder's step loops,
#: ``codec/rans_jit.py``; the encoder's lattice pass, ``codec/lattice_jit.py``): ``"compiled"`` (numba, the default) or ``"numpy"`` (the reference twin, 10-50x
#: slower; for tests and for comparing). Read at every call by :func:`cpu_impl`.
CPU_IMPL = "compiled"


def cpu_impl(numpy_impl, compiled_impl):
    """The CPU implementation of a codec step that has a compiled twin: ``compiled_impl`` unless
    :data:`CPU_IMPL` is ``"numpy"``. Both produce bit-identical results; the compiled one raises ImportError
    when numba is missing (no silent fallback)."""
    if CPU_IMPL not in ("compiled", "numpy"):
        raise ValueError(f"hq_diffusion.codec._np.CPU_IMPL must be 'compiled' or 'numpy', got {CPU_IMPL!r}")
    return compiled_impl if CPU_IMPL == "compiled" else numpy_impl


def select(t: torch.Tensor, numpy_impl, torch_impl, compiled_impl=None):
    """The implementation of a codec step for tensor ``t``: on the CPU ``numpy_impl`` (numpy is several times
    faster there than torch), or ``compiled_impl`` where the step has one (see :func:`cpu_impl`);
    ``torch_impl`` for every other device (a GPU runs the torch code natively; a round trip through host
    memory would cost more than it saves). All implementations take the same arguments and return
    bit-identical results on ``t``'s device."""
    if t.device.type != "cpu":
        return torch_impl
    return numpy_impl if compiled_impl is None else cpu_impl(numpy_impl, compiled_impl)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """CPU numpy view of ``t`` (zero copy when ``t`` is a contiguous CPU tensor, else one copy)."""
    return t.detach().to("cpu").contiguous().numpy()


def to_torch(a: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """Wrap a numpy array as a tensor (zero copy) and move it to ``device`` (default: stay on CPU)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device is not None and torch.device(device).type != "cpu":
        t = t.to(device)
    return t


def seq_sum(rows: np.ndarray) -> np.ndarray:
    """Left-to-right sum over the first axis: ``((r₀ + r₁) + r₂) + …`` — the order torch's CPU
    ``sum(-1)`` uses for a contiguous ``(M, n)`` float32 tensor with a small last dim, so float results
    are bit-identical to it. rows: (n, C) → (C,) in the rows' dtype."""
    acc = rows[0] + rows[1] if len(rows) > 1 else rows[0].copy()
    for r in rows[2:]:
        acc += r
    return acc


def xor_rows(rows: np.ndarray) -> np.ndarray:
    """XOR over the first axis of an integer array (n, C) → (C,)."""
    acc = rows[0] ^ rows[1] if len(rows) > 1 else rows[0].copy()
    for r in rows[2:]:
        acc ^= r
    return acc
