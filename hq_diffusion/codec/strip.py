"""Lossless bit-stripping: lattice integers → non-negative symbol streams, and back (docs/ARCHITECTURE.md).

Each lattice yields one or two symbol *streams*; symbols of one stream share a magnitude and so a Rice
parameter. All streams are int32, row-major over the vectors of ``y``.

- e8: one stream, 8 symbols per vector: ``zz(s₁..s₇)`` and ``2·zz(t) + c`` where ``c = y₁ & 1``,
  ``s = (y − c) >> 1`` and ``t = (s₈ − parity(s₁..s₇)) >> 1`` (Σs is even, so s₈'s parity is known).
- d4: stream 0 holds ``zz(s₁..s₃)`` (3 per vector), stream 1 holds ``zz(t)`` (1 per vector), with
  ``s = y >> 1`` and ``t = (s₄ − parity(s₁..s₃)) >> 1``.
- a2: stream 0 holds ``zz(t_y)`` with ``t_y = (n_y − (n_x & 1)) >> 1``, stream 1 holds ``zz(n_x)``.
- z: one stream ``zz(y)``.

``zz(n) = 2n`` for n ≥ 0 and ``−2n − 1`` otherwise.

On the CPU the work runs in numpy (E8 in cache-sized chunks of vectors), bit-identical to the former
torch code, which is kept at the end of this file for tensors on other devices and as the tests' reference
(``_np.select`` makes that choice).
"""
from __future__ import annotations

import numpy as np
import torch

from ._np import CHUNK, select, to_numpy, to_torch, xor_rows
from .lattice import lattice_info

NUM_STREAMS = {"e8": 1, "d4": 2, "a2": 2, "z": 1}


def zigzag(n: torch.Tensor) -> torch.Tensor:
    """Signed → non-negative: 0,−1,1,−2,… ↦ 0,1,2,3,…; int32 in, int32 out."""
    return (n << 1) ^ (n >> 31)


def unzigzag(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`zigzag`; int32 in, int32 out."""
    return (z >> 1) ^ -(z & 1)


def _zz(n: np.ndarray) -> np.ndarray:
    """numpy :func:`zigzag`: int32 → new int32 array."""
    out = n << 1
    out ^= n >> 31
    return out


def _unzz(z: np.ndarray) -> np.ndarray:
    """numpy :func:`unzigzag`: int32 → new int32 array."""
    out = z << 31
    out >>= 31  # −(z & 1)
    out ^= z >> 1
    return out


def _row_chunks(rows: int):
    for s in range(0, rows, CHUNK):
        yield slice(s, min(rows, s + CHUNK))


def _xor_low_bit(cols: np.ndarray) -> np.ndarray:
    """Parity of the sum of the columns of an int32 (C, m) array: XOR of the low bits → int32 (C,)."""
    return xor_rows(cols.T) & 1


_FIRST7 = np.uint64(0x00FFFFFFFFFFFFFF)  # bytes 0..6 of a little-endian uint64


def _parity_first7(s: np.ndarray) -> np.ndarray:
    """Parity of s₁ + … + s₇ for each row of an int32 (C, 8) array → uint8 (C,) in {0, 1}: the 8 low
    bits as the bytes of one uint64 per row, byte 7 masked off, popcount."""
    low = (s & 1).astype(np.uint8).view(np.uint64)[:, 0]
    low &= _FIRST7
    return np.bitwise_count(low) & 1


def _strip_e8(y: np.ndarray) -> np.ndarray:
    """y: int32 (M, 8) → symbols int32 (M, 8), chunked over rows so the work stays in cache."""
    out = np.empty_like(y)
    for sl in _row_chunks(len(y)):
        yc, o = y[sl], out[sl]
        c = yc[:, 0] & 1
        s = yc - np.repeat(c, 8).reshape(-1, 8)  # (y − c) >> 1 per coordinate
        s >>= 1
        np.left_shift(s, 1, out=o)
        o ^= s >> 31  # zz(s) for all 8; column 7 replaced below
        t = s[:, 7] - _parity_first7(s)
        t >>= 1
        o[:, 7] = (_zz(t) << 1) | c
    return out


def _unstrip_e8(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_strip_e8`: symbols int32 (M, 8) → lattice integers int32 (M, 8)."""
    out = np.empty_like(z)
    for sl in _row_chunks(len(z)):
        zc, o = z[sl], out[sl]
        c = zc[:, 7] & 1
        x = xor_rows(zc[:, :7].T)
        par = (x ^ (x >> 1)) & 1  # low bit of unzz(z) is bit 0 ^ bit 1 of z
        s7 = (_unzz(zc[:, 7] >> 1) << 1) + par
        np.left_shift(zc, 31, out=o)  # unzz(z) for all 8; column 7 replaced below
        o >>= 31
        o ^= zc >> 1
        o[:, 7] = s7
        o <<= 1
        o += np.repeat(c, 8).reshape(-1, 8)
    return out


_LOW8 = np.uint64(0x0101010101010101)  # bit 0 of every byte of a uint64
_LOW7 = np.uint64(0x0001010101010101)  # bit 0 of bytes 0..6
_HALF8 = np.uint64(0x7F7F7F7F7F7F7F7F)
_EVEN7 = np.uint64(0x00FEFEFEFEFEFEFE)
_SWAR_CHUNK = 1 << 16  # vectors per chunk: a few 512 KiB uint64 temporaries


def unstrip_e8_int8(z: torch.Tensor) -> torch.Tensor:
    """:func:`unstrip` of an E8 stream straight to int8, for lattice integers that fit int8.

    z: int32 (8·M,) symbols on the CPU, every one ≤ 127 (which holds whenever ``|y| ≤ 127``: ``zz(s)`` with
    ``|s| ≤ 64``). Returns int8 (M, 8), equal to ``unstrip("e8", [z], (M, 8))``. Each vector is one uint64
    of 8 byte symbols, undone with SWAR arithmetic on whole words (bytes 0..6 unzigzagged at once; the
    parity of s₁..s₇ by popcount; byte 7 separately). Raises ValueError when a symbol exceeds 127 (use
    :func:`unstrip`) or the length is not a multiple of 8."""
    if z.numel() % 8:
        raise ValueError(f"an E8 stream has a multiple of 8 symbols, got {z.numel()}")
    zn = to_numpy(z.to(torch.int32).reshape(-1))
    if zn.size and (int(zn.max()) > 127 or int(zn.min()) < 0):
        raise ValueError(f"E8 symbols span [{int(zn.min())}, {int(zn.max())}]; the int8 unstrip needs 0..127")
    w = zn.astype(np.uint8).view(np.uint64)
    out = np.empty_like(w)
    one = np.uint64(1)
    for s in range(0, w.size, _SWAR_CHUNK):
        wc = w[s:s + _SWAR_CHUNK]
        a = (wc >> one) & _HALF8
        a ^= (wc & _LOW8) * np.uint64(0xFF)  # unzigzag of every byte: (z >> 1) ^ −(z & 1)
        c = (wc >> np.uint64(56)) & one  # y₁'s parity, the low bit of symbol 8
        par = (np.bitwise_count(a & _LOW7) & 1).astype(np.int64)  # parity of s₁ + … + s₇
        h = (wc >> np.uint64(57)).astype(np.int64)  # zz(t)
        t = (h >> 1) ^ -(h & 1)
        y8 = (4 * t + 2 * par + c.astype(np.int64)).astype(np.uint64) & np.uint64(0xFF)  # 2·(2t + par) + c
        o = (a << one) & _EVEN7  # y = 2s + c for coordinates 1..7
        o |= c * _LOW7
        o |= y8 << np.uint64(56)
        out[s:s + _SWAR_CHUNK] = o
    return to_torch(out.view(np.int8).reshape(-1, 8), z.device)


def strip(lattice: str, y: torch.Tensor) -> list[torch.Tensor]:
    """Lattice integers → symbol streams. y: (..., n) int32, n a multiple of the lattice dimension.
    Returns a list of 1-D int32 tensors on y's device (see module docstring)."""
    return select(y, _strip_np, _strip_torch)(lattice, y)


def _strip_np(lattice: str, y: torch.Tensor) -> list[torch.Tensor]:
    info = lattice_info(lattice)
    dev = y.device
    yn = to_numpy(y.to(torch.int32).reshape(-1, info.dim))
    if lattice == "z":
        out = [_zz(yn.reshape(-1))]
    elif lattice == "a2":
        nx = yn[:, 1]
        ty = yn[:, 0] - (nx & 1)
        ty >>= 1
        out = [_zz(ty), _zz(np.ascontiguousarray(nx))]
    elif lattice == "e8":
        out = [_strip_e8(yn).reshape(-1)]
    else:  # d4
        s = yn >> 1
        t = s[:, 3] - _xor_low_bit(s[:, :3])
        t >>= 1
        out = [_zz(np.ascontiguousarray(s[:, :3])).reshape(-1), _zz(t)]
    return [to_torch(z, dev) for z in out]


def stream_lengths(lattice: str, numel: int) -> list[int]:
    """Number of symbols in each stream for ``numel`` lattice integers."""
    d = lattice_info(lattice).dim
    nv = numel // d
    return {"e8": [numel], "z": [numel], "a2": [nv, nv], "d4": [3 * nv, nv]}[lattice]


def unstrip(lattice: str, streams: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`strip`. Returns int32 lattice integers of ``shape`` on the streams' device."""
    return select(streams[0], _unstrip_np, _unstrip_torch)(lattice, streams, shape)


def _unstrip_np(lattice: str, streams: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    lattice_info(lattice)
    dev = streams[0].device
    zs = [to_numpy(z.to(torch.int32).reshape(-1)) for z in streams]
    if lattice == "z":
        y = _unzz(zs[0])
    elif lattice == "a2":
        ty, nx = _unzz(zs[0]), _unzz(zs[1])
        y = np.empty((len(nx), 2), dtype=np.int32)
        np.left_shift(ty, 1, out=y[:, 0])
        y[:, 0] += nx & 1
        y[:, 1] = nx
    elif lattice == "e8":
        y = _unstrip_e8(zs[0].reshape(-1, 8))
    else:  # d4
        s3 = _unzz(zs[0]).reshape(-1, 3)
        y = np.empty((len(s3), 4), dtype=np.int32)
        y[:, :3] = s3
        np.left_shift(_unzz(zs[1]), 1, out=y[:, 3])
        y[:, 3] += _xor_low_bit(s3)
        y <<= 1
    return to_torch(y, dev).reshape(shape)


# ---- torch path -------------------------------------------------------------------------------
# The former pure-torch implementation, kept verbatim for tensors on other devices (a GPU runs it
# natively) and as the reference of the tests.

def _strip_torch(lattice: str, y: torch.Tensor) -> list[torch.Tensor]:
    """Torch version of :func:`strip` (the former code). Note: its d4 stream 1 comes out int64."""
    info = lattice_info(lattice)
    y = y.to(torch.int32).reshape(-1, info.dim)
    if lattice == "z":
        return [zigzag(y.reshape(-1))]
    if lattice == "a2":
        ny, nx = y[:, 0], y[:, 1]
        ty = (ny - (nx & 1)) >> 1
        return [zigzag(ty), zigzag(nx)]
    if lattice == "e8":
        c = y[:, :1] & 1
        s = (y - c) >> 1
        par = s[:, :7].sum(1, keepdim=True) & 1
        t = (s[:, 7:] - par) >> 1
        out = torch.empty_like(y)
        out[:, :7] = zigzag(s[:, :7])
        out[:, 7:] = (zigzag(t) << 1) | c
        return [out.reshape(-1)]
    # d4
    s = y >> 1
    par = s[:, :3].sum(1, keepdim=True) & 1
    t = (s[:, 3:] - par) >> 1
    return [zigzag(s[:, :3]).reshape(-1), zigzag(t).reshape(-1)]


def _unstrip_torch(lattice: str, streams: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Torch version of :func:`unstrip` (the former code)."""
    info = lattice_info(lattice)
    if lattice == "z":
        return unzigzag(streams[0]).reshape(shape)
    if lattice == "a2":
        ty, nx = unzigzag(streams[0]), unzigzag(streams[1])
        ny = (ty << 1) + (nx & 1)
        return torch.stack((ny, nx), -1).reshape(shape)
    if lattice == "e8":
        sym = streams[0].reshape(-1, 8)
        c = sym[:, 7:] & 1
        s = torch.empty_like(sym)
        s[:, :7] = unzigzag(sym[:, :7])
        par = s[:, :7].sum(1, keepdim=True) & 1
        s[:, 7:] = (unzigzag(sym[:, 7:] >> 1) << 1) + par
        return ((s << 1) + c).reshape(shape)
    s3 = unzigzag(streams[0]).reshape(-1, 3)
    par = s3.sum(1, keepdim=True) & 1
    s4 = (unzigzag(streams[1]).reshape(-1, 1) << 1) + par
    return (torch.cat((s3, s4), 1) << 1).reshape(shape).to(torch.int32)
