"""Counter-based 32-bit hashing for the RHT sign vectors.

The signs of the randomized Hadamard transform are never stored: every implementation (this torch
reference, the Triton kernels, a later reload) regenerates them from ``(seed, key, column)``. The hash is
the "lowbias32" integer finalizer applied to a counter, so sign ``c`` of a tensor only depends on the three
integers and the same arithmetic can be written in any language with 32-bit wrap-around multiplication.
"""
from __future__ import annotations

import functools
import zlib

import torch

MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def mix32_int(x: int) -> int:
    """lowbias32 finalizer on a Python int (the brute-force reference of :func:`mix32`)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 finalizer, elementwise. ``x``: int64 tensor of values in [0, 2**32); returns the same.

    Multiplications are split into 16-bit halves so no intermediate leaves the int64 range.
    """
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mulmod32(x, _M1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, _M2)
    return x ^ (x >> 16)


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def key_to_u32(key: int | str) -> int:
    """Map a layer key (an int, or a name such as ``"blocks.0.attn.to_q"``) to a stable uint32."""
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8")) & MASK32
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"key must be an int or a str, got {type(key).__name__}")
    return key & MASK32


def stream_base(seed: int, key: int | str) -> int:
    """The per-tensor hash base derived from ``(seed, key)``; a uint32."""
    k = key_to_u32(key)
    return mix32_int((seed & MASK32) ^ mix32_int((k + _GOLDEN) & MASK32))


def rht_signs(n: int, seed: int, key: int | str, device=None) -> torch.Tensor:
    """The ±1 sign vector of length ``n`` for columns ``0..n-1``. Returns float32, shape (n,).

    Cached per ``(n, seed, key, device)``: every forward of a quantized layer asks for the same vector.
    The returned tensor is shared; do not modify it in place."""
    return _rht_signs_cached(int(n), int(seed), key, None if device is None else torch.device(device))


@functools.lru_cache(maxsize=4096)
def _rht_signs_cached(n: int, seed: int, key: int | str, device) -> torch.Tensor:
    base = stream_base(seed, key)
    cols = torch.arange(n, dtype=torch.int64, device=device)
    h = mix32(cols ^ base)
    return 1.0 - 2.0 * (h >> 31).to(torch.float32)
