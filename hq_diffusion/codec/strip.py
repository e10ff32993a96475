"""Lossless bit-stripping: lattice integers → non-negative symbol streams, and back (DESIGN.md §1.4).

Each lattice yields one or two symbol *streams*; symbols of one stream share a magnitude and so a Rice
parameter. All streams are int32, row-major over the vectors of ``y``.

- e8: one stream, 8 symbols per vector: ``zz(s₁..s₇)`` and ``2·zz(t) + c`` where ``c = y₁ & 1``,
  ``s = (y − c) >> 1`` and ``t = (s₈ − parity(s₁..s₇)) >> 1`` (Σs is even, so s₈'s parity is known).
- d4: stream 0 holds ``zz(s₁..s₃)`` (3 per vector), stream 1 holds ``zz(t)`` (1 per vector), with
  ``s = y >> 1`` and ``t = (s₄ − parity(s₁..s₃)) >> 1``.
- a2: stream 0 holds ``zz(t_y)`` with ``t_y = (n_y − (n_x & 1)) >> 1``, stream 1 holds ``zz(n_x)``.
- z: one stream ``zz(y)``.

``zz(n) = 2n`` for n ≥ 0 and ``−2n − 1`` otherwise.
"""
from __future__ import annotations

import torch

from .lattice import lattice_info

NUM_STREAMS = {"e8": 1, "d4": 2, "a2": 2, "z": 1}


def zigzag(n: torch.Tensor) -> torch.Tensor:
    """Signed → non-negative: 0,−1,1,−2,… ↦ 0,1,2,3,…; int32 in, int32 out."""
    return (n << 1) ^ (n >> 31)


def unzigzag(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`zigzag`; int32 in, int32 out."""
    return (z >> 1) ^ -(z & 1)


def strip(lattice: str, y: torch.Tensor) -> list[torch.Tensor]:
    """Lattice integers → symbol streams. y: (..., n) int32, n a multiple of the lattice dimension.
    Returns a list of 1-D int32 tensors (see module docstring)."""
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


def stream_lengths(lattice: str, numel: int) -> list[int]:
    """Number of symbols in each stream for ``numel`` lattice integers."""
    d = lattice_info(lattice).dim
    nv = numel // d
    return {"e8": [numel], "z": [numel], "a2": [nv, nv], "d4": [3 * nv, nv]}[lattice]


def unstrip(lattice: str, streams: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`strip`. Returns int32 lattice integers of ``shape``."""
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
