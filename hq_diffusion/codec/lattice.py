"""Nearest-point quantizers for the lattices E8, D4, A2 and Z in integer form.

Integer forms (DESIGN.md §1.3):

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True)
class LatticeInfo:
    name: str
    dim: int
    G: float  # normalized second moment
    voronoi_mse: float  # per vector, in integer-form units
    shannon_gap_db: float  # granular gap of an ideally entropy-coded lattice


LATTICES: dict[str, LatticeInfo] = {
    "e8": LatticeInfo("e8", 8, 0.0716568, 0.0716568 * 4.0 * 8, 0.88),
    "d4": LatticeInfo("d4", 4, 0.076603, 0.076603 * math.sqrt(32.0) * 4, 1.17),
    "a2": LatticeInfo("a2", 2, 5 * SQRT3 / 108, 5.0 / 9.0, 1.37),
    "z": LatticeInfo("z", 1, 1.0 / 12.0, 1.0 / 12.0, 1.53),
}


def lattice_info(name: str) -> LatticeInfo:
    try:
        return LATTICES[name]
    except KeyError:
        raise ValueError(f"unknown lattice {name!r}; choose one of {sorted(LATTICES)}") from None


def _fix_sum_mod4(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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


def nearest_e8(v: torch.Tensor) -> torch.Tensor:
    """Nearest point of 2·E8. v: (..., 8k) float32 (already scaled by α). Returns int32, same shape."""
    shp = v.shape
    v = v.reshape(-1, 8).to(torch.float32)
    ye = _fix_sum_mod4(v, _round_even(v))
    yo = _fix_sum_mod4(v, _round_odd(v))
    de = (v - ye).square().sum(-1, keepdim=True)
    do = (v - yo).square().sum(-1, keepdim=True)
    y = torch.where(do < de, yo, ye)
    return y.to(torch.int32).reshape(shp)


def nearest_d4(v: torch.Tensor) -> torch.Tensor:
    """Nearest point of 2·D4. v: (..., 4k) float32. Returns int32, same shape."""
    shp = v.shape
    v = v.reshape(-1, 4).to(torch.float32)
    return _fix_sum_mod4(v, _round_even(v)).to(torch.int32).reshape(shp)


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
