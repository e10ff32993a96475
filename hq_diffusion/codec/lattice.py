"""Nearest-point quantizers for the lattices E8, D4, A2 and Z in integer form.

Integer forms (docs/ARCHITECTURE.md):

======  ====================================================================  ===  =====================
name    members (integer vectors ``y``)                                        n    Voronoi MSE / vector
======  ====================================================================  ===  =====================
e8      2·E8: all 8 coordinates of one parity and ``Σy ≡ 0 (mod 4)``          8    2.2930
d4      2·D4: all coordinates even and ``Σy ≡ 0 (mod 4)``                     4    1.7333
a2      2·A2: pairs ``(n_y, n_x)``, ``n_y + n_x`` even; point ``(√3·n_y, n_x)``  2    5/9
z       Z: every integer                                                      1    1/12
======  ====================================================================  ===  =====================

A scaled input ``v = α·x`` is mapped to the nearest point ``p(y)``; the reconstruction is
``x̂ = p(y) / α`` where ``p`` multiplies the first coordinate of each A2 pair by √3 and is the identity
otherwise. All functions work on the last axis, which must be a multiple of the lattice dimension.

On the CPU, E8 and D4 run in numpy over cache-sized chunks of vectors in transposed layout (one row
per coordinate, so every per-coordinate step is a contiguous operation); tensors on other devices take
the former torch code (kept below); ``_np.select`` makes that choice. The numpy path reproduces the
torch code bit for bit, ties included: the same float32 operations for the candidates and their errors, ``torch.argmax``'s
first-index rule for the coordinate to move, and coordinate sums (the mod-4 test and the squared
distances) added left to right in float32 — the order of torch's CPU ``sum(-1)`` over a contiguous
(M, 8) float32 tensor (tests/test_codec_speed_paths.py checks this against the torch code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._np import CHUNK, select, seq_sum, to_numpy, to_torch

SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True)
class LatticeInfo:
    name: str
    dim: int
    G: float  # normalized second moment
    voronoi_mse: float  # per vector, in integer-form units
    shannon_gap_db: float  # granular gap of an ideally entropy-coded lattice


LATTICES: dict[str, LatticeInfo] = {
    # exact closed forms (Conway & Sloane, ch. 21): G(E8) = 929/12960, G(D4) = 13/(120·√2)
    "e8": LatticeInfo("e8", 8, 929 / 12960, 929 / 12960 * 4.0 * 8, 0.88),
    "d4": LatticeInfo("d4", 4, 13 / (120 * math.sqrt(2.0)), 26 / 15, 1.17),
    "a2": LatticeInfo("a2", 2, 5 * SQRT3 / 108, 5.0 / 9.0, 1.37),
    "z": LatticeInfo("z", 1, 1.0 / 12.0, 1.0 / 12.0, 1.53),
}


def lattice_info(name: str) -> LatticeInfo:
    try:
        return LATTICES[name]
    except KeyError:
        raise ValueError(f"unknown lattice {name!r}; choose one of {sorted(LATTICES)}") from None


def _first_argmax(a: np.ndarray) -> np.ndarray:
    """Index of the first maximum along axis 0 (``torch.argmax`` semantics). a: float32 (n, C) without
    NaN → int64 (C,). Counts the leading entries that differ from the maximum."""
    m = np.maximum(a[0], a[1])
    for j in range(2, len(a)):
        np.maximum(m, a[j], out=m)
    ne = (a != m).view(np.uint8)
    run = ne[0].copy()
    idx = run.copy()
    for j in range(1, len(a) - 1):
        run &= ne[j]
        idx += run
    return idx.astype(np.int64)


def _fix_sum_mod4(vt: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conway–Sloane fix-up of one candidate, on a chunk in transposed layout.

    For vectors whose coordinate sum is ≡ 2 (mod 4), the coordinate with the largest rounding error
    (the first one on ties, like ``torch.argmax``) moves by ±2 toward the input (+2 when its error is
    ≥ 0). vt: float32 (n, C) input, one vector per column; y: float32 (n, C) candidate integers.
    Returns ``(err, flat, step)``: float32 (n, C) ``vt − y``; int64 (C,) index into ``y.ravel()`` of
    the coordinate to move; float32 (C,) the move: ±2, or 0 for vectors already ≡ 0 (mod 4).
    ``y`` is not modified.
    """
    c = y.shape[1]
    err = vt - y
    flat = _first_argmax(np.abs(err))
    flat *= c
    flat += np.arange(c)
    step = (err.ravel()[flat] >= 0) * np.float32(4.0)
    step -= np.float32(2.0)
    # Σy summed as torch sums it (left to right in float32), then the same mod-4 test.
    q = seq_sum(y)
    q *= np.float32(0.25)
    step *= np.rint(q) != q
    return err, flat, step


def _round_even_np(v: np.ndarray) -> np.ndarray:
    """2·round(v/2), round half to even (float32 in, float32 out)."""
    y = v * np.float32(0.5)
    np.rint(y, out=y)
    y *= np.float32(2.0)
    return y


def _round_odd_np(v: np.ndarray) -> np.ndarray:
    """2·round((v − 1)/2) + 1, round half to even (float32 in, float32 out)."""
    y = v - np.float32(1.0)
    y *= np.float32(0.5)
    np.rint(y, out=y)
    y *= np.float32(2.0)
    y += np.float32(1.0)
    return y


def _e8_chunk(vt: np.ndarray) -> np.ndarray:
    """Nearest 2·E8 points of a chunk. vt: float32 (8, C), one vector per column → float32 (8, C).

    Both candidates (all even, all odd) are fixed to Σ ≡ 0 (mod 4); the odd one wins only when its
    squared distance is strictly smaller. Distances are float32 sums of float32 squares added left to
    right, exactly as the former torch code computed them, so float ties resolve the same way."""
    cands, dists, moves = [], [], []
    vflat = vt.ravel()
    for y in (_round_even_np(vt), _round_odd_np(vt)):
        sq, flat, step = _fix_sum_mod4(vt, y)
        sq *= sq
        moved = vflat[flat] - (y.ravel()[flat] + step)  # = the plain error where step == 0
        sq.ravel()[flat] = moved * moved
        cands.append(y)
        dists.append(seq_sum(sq))
        moves.append((flat, step))
    odd = dists[1] < dists[0]
    # y = odd ? y_odd : y_even, as ye + odd·(yo − ye): exact, since yo − ye is a small integer
    y, d = cands[0], cands[1] - cands[0]
    d *= odd
    y += d
    flat = np.where(odd, moves[1][0], moves[0][0])
    y.ravel()[flat] += np.where(odd, moves[1][1], moves[0][1])
    return y


def _d4_chunk(vt: np.ndarray) -> np.ndarray:
    """Nearest 2·D4 points of a chunk. vt: float32 (4, C) → float32 (4, C)."""
    y = _round_even_np(vt)
    _, flat, step = _fix_sum_mod4(vt, y)
    y.ravel()[flat] += step
    return y


def _nearest_chunked(v: torch.Tensor, dim: int, chunk_fn) -> torch.Tensor:
    """Run ``chunk_fn`` (float32 (dim, C) → float32 (dim, C)) over the vectors of ``v`` in cache-sized
    chunks, transposed so that every per-coordinate step is a contiguous row operation.
    v: (..., dim·k) float → int32, same shape and device."""
    shp, dev = v.shape, v.device
    vn = to_numpy(v.reshape(-1, dim).to(torch.float32))
    out = np.empty(vn.shape, dtype=np.int32)
    for s in range(0, vn.shape[0], CHUNK):
        yt = chunk_fn(np.ascontiguousarray(vn[s:s + CHUNK].T))
        out[s:s + CHUNK] = yt.astype(np.int32).T
    return to_torch(out, dev).reshape(shp)


def _nearest_e8_np(v: torch.Tensor) -> torch.Tensor:
    return _nearest_chunked(v, 8, _e8_chunk)


def _nearest_d4_np(v: torch.Tensor) -> torch.Tensor:
    return _nearest_chunked(v, 4, _d4_chunk)


def nearest_e8(v: torch.Tensor) -> torch.Tensor:
    """Nearest point of 2·E8. v: (..., 8k) float32 (already scaled by α). Returns int32, same shape."""
    return select(v, _nearest_e8_np, _nearest_e8_torch)(v)


def nearest_d4(v: torch.Tensor) -> torch.Tensor:
    """Nearest point of 2·D4. v: (..., 4k) float32. Returns int32, same shape."""
    return select(v, _nearest_d4_np, _nearest_d4_torch)(v)


# Torch path: the former implementation, kept verbatim for tensors on other devices (a GPU runs it
# natively) and as the reference of the tests; nearest_a2 and nearest_z use it everywhere.

def _fix_sum_mod4_torch(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For vectors (last axis) whose coordinate sum is ≡ 2 (mod 4), move the coordinate with the largest
    rounding error by ±2 toward the input. v: (..., n) float32; y: (..., n) float32 integers."""
    err = v - y
    bad = (torch.remainder(y.sum(-1), 4.0) != 0).unsqueeze(-1)
    idx = err.abs().argmax(-1, keepdim=True)
    e = err.gather(-1, idx)
    step = torch.where(e >= 0, 2.0, -2.0)
    return y.scatter_add(-1, idx, torch.where(bad, step, torch.zeros_like(step)))


def _round_even(v: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.round(v * 0.5)


def _round_odd(v: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.round((v - 1.0) * 0.5) + 1.0


def _nearest_e8_torch(v: torch.Tensor) -> torch.Tensor:
    shp = v.shape
    v = v.reshape(-1, 8).to(torch.float32)
    ye = _fix_sum_mod4_torch(v, _round_even(v))
    yo = _fix_sum_mod4_torch(v, _round_odd(v))
    de = (v - ye).square().sum(-1, keepdim=True)
    do = (v - yo).square().sum(-1, keepdim=True)
    y = torch.where(do < de, yo, ye)
    return y.to(torch.int32).reshape(shp)


def _nearest_d4_torch(v: torch.Tensor) -> torch.Tensor:
    shp = v.shape
    v = v.reshape(-1, 4).to(torch.float32)
    return _fix_sum_mod4_torch(v, _round_even(v)).to(torch.int32).reshape(shp)


def nearest_a2(v: torch.Tensor) -> torch.Tensor:
    """Nearest point of 2·A2 in (n_y, n_x) form. v: (..., 2k) float32 physical coordinates (α·x).
    Returns int32, same shape: even positions n_y, odd positions n_x, with n_y + n_x even."""
    shp = v.shape
    v = v.reshape(-1, 2).to(torch.float32)
    a = v[:, 0] / SQRT3
    b = v[:, 1]
    ey, ex = _round_even(a), _round_even(b)
    oy, ox = _round_odd(a), _round_odd(b)
    de = 3.0 * (a - ey).square() + (b - ex).square()
    do = 3.0 * (a - oy).square() + (b - ox).square()
    use_odd = do < de
    y = torch.stack((torch.where(use_odd, oy, ey), torch.where(use_odd, ox, ex)), -1)
    return y.to(torch.int32).reshape(shp)


def nearest_z(v: torch.Tensor) -> torch.Tensor:
    """Nearest integer. v: (...,) float32. Returns int32."""
    return torch.round(v.to(torch.float32)).to(torch.int32)


_NEAREST = {"e8": nearest_e8, "d4": nearest_d4, "a2": nearest_a2, "z": nearest_z}


def nearest(lattice: str, v: torch.Tensor) -> torch.Tensor:
    """Nearest lattice point of ``v`` (float, last axis a multiple of the lattice dimension); int32."""
    lattice_info(lattice)
    return _NEAREST[lattice](v)


def axis_gain(lattice: str, n: int, device=None) -> torch.Tensor | None:
    """Per-coordinate factor from integer form to physical coordinates: √3 on the first coordinate of
    every A2 pair, 1 elsewhere. Returns float32 (n,), or None when it is all ones."""
    if lattice != "a2":
        return None
    g = torch.ones(n, dtype=torch.float32, device=device)
    g[0::2] = SQRT3
    return g


def to_physical(lattice: str, y: torch.Tensor) -> torch.Tensor:
    """Integer form → physical lattice point (float32). y: (..., n) integer tensor."""
    p = y.to(torch.float32)
    g = axis_gain(lattice, y.shape[-1], y.device)
    return p if g is None else p * g


def is_member(lattice: str, y: torch.Tensor) -> torch.Tensor:
    """Whether each vector of ``y`` (int, last axis = multiples of dim) is a lattice point; bool (..., n/dim)."""
    info = lattice_info(lattice)
    yv = y.reshape(*y.shape[:-1], -1, info.dim).to(torch.int64)
    if lattice == "z":
        return torch.ones(yv.shape[:-1], dtype=torch.bool, device=y.device)
    if lattice == "a2":
        return (yv.sum(-1) % 2) == 0
    par = yv % 2
    same = (par == par[..., :1]).all(-1)
    if lattice == "d4":
        same = same & (par[..., 0] == 0)
    return same & (yv.sum(-1) % 4 == 0)


def alpha_for_snr(lattice: str, snr_db: float) -> float:
    """High-resolution scale for a target SNR on unit-variance input: α = sqrt(SNR · MSE_vor / n)."""
    info = lattice_info(lattice)
    return math.sqrt(10.0 ** (snr_db / 10.0) * info.voronoi_mse / info.dim)
