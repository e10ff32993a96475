"""Triton helpers shared by the kernels (imported only when the Triton side is used).

Everything here is ``@triton.jit`` device code plus small host utilities (interpreter detection, persistent
grid sizes, cached constant tensors).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton import knobs

from hq_diffusion.codec.rht import _hadamard as codec_hadamard

# ---- host utilities ----------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1``): kernels then run on the CPU."""
    return bool(knobs.runtime.interpret)


def max_programs(device: torch.device, per_sm: int = 4) -> int:
    """Upper bound of a persistent grid: ``per_sm`` programs per SM on CUDA, a few in the interpreter."""
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=32)
def _hadamard_cached(size: int, block: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = codec_hadamard(block, "cpu", None)
    m = torch.block_diag(*([h] * (size // block))) if size > block else h
    return m.to(device=device, dtype=dtype).contiguous()


def hadamard(size: int, block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, size) Sylvester Hadamard ±1 matrix of order ``block`` repeated on the diagonal (block ≤ size).

    ±1 is exact in every float dtype, so ``x @ H`` with float32 accumulation is the float32 FWHT sum."""
    return _hadamard_cached(size, block, dtype, str(device))


# ---- device code -------------------------------------------------------------------------------------------


@triton.jit
def rht_signs(cols, base):
    """±1.0 (float32) RHT signs of columns ``cols`` (int32 tensor) for the stream base ``base`` (a uint32 value).

    lowbias32 of ``cols ^ base`` in uint32 arithmetic; the sign is negative where the top bit is set
    (the same arithmetic as ``hq_diffusion.codec.hashing.rht_signs``)."""
    h = cols.to(tl.uint32) ^ base.to(tl.uint32)
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D).to(tl.uint32)
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B).to(tl.uint32)
    h = h ^ (h >> 16)
    return 1.0 - 2.0 * (h >> 31).to(tl.float32)


@triton.jit
def round_half_even(v):
    """Round float32 to the nearest integer, ties to even (``torch.round``), exactly, for |v| < 2**23."""
    r = tl.floor(v)
    f = v - r  # exact
    odd = (r.to(tl.int32) & 1) == 1
    up = (f > 0.5) | ((f == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def clz32(x):
    """Leading zero bits of uint32 ``x`` (32 for 0), branch-free: five halving steps."""
    n = tl.zeros(x.shape, dtype=tl.int32)
    c = x < 0x10000
    n = tl.where(c, n + 16, n)
    x = tl.where(c, x << 16, x)
    c = x < 0x1000000
    n = tl.where(c, n + 8, n)
    x = tl.where(c, x << 8, x)
    c = x < 0x10000000
    n = tl.where(c, n + 4, n)
    x = tl.where(c, x << 4, x)
    c = x < 0x40000000
    n = tl.where(c, n + 2, n)
    x = tl.where(c, x << 2, x)
    n = tl.where(x < 0x80000000, n + 1, n)
    return tl.where(x == 0, 32, n)


@triton.jit
def unzigzag(z):
    """Inverse zigzag on int32: 0,1,2,3,… ↦ 0,−1,1,−2,…"""
    return (z >> 1) ^ (-(z & 1))


@triton.jit
def cast_out(f, ptr):
    """float32 → the element type of ``ptr``. bfloat16 is rounded to nearest even with integer ops (the
    same result as ``torch.Tensor.to(torch.bfloat16)`` for finite values) because the interpreter's own
    float32 → bfloat16 cast truncates; on the GPU this costs three integer ops per element."""
    if ptr.dtype.element_ty == tl.bfloat16:
        b = f.to(tl.uint32, bitcast=True)
        b = b + (0x7FFF + ((b >> 16) & 1))
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return f.to(ptr.dtype.element_ty)


#: Whether the ``@triton.jit`` functions of this import were built for the interpreter (see ``dispatch``).
LOADED_INTERPRETED = interpreting()
