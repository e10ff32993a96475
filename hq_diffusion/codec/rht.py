"""Randomized Hadamard transform (RHT) per tile along the last axis.

For a row ``x`` of length ``n_pad`` split into tiles of ``H`` consecutive coordinates,
``y_tile = FWHT_H(x_tile ⊙ d_tile) / sqrt(H)`` with ``d ∈ {±1}^n_pad`` regenerated from
``(seed, key, column)`` (:mod:`hashing`). The transform is orthonormal, so ``x Wᵀ = rht(x) rht(W)ᵀ``: a
weight is stored rotated and the activations are rotated online.

Rows are zero-padded to a multiple of the tile (:func:`plan_tiles`: at most ~0.8% beyond the multiple of 8
the lattice needs); the padded coordinates are stored like any other and counted in the rate. A weight whose width
the plan pads can instead be coded as an unpadded main part plus a transposed tail (:mod:`.split`), as
``HQLinear`` and ``bench rd`` do.
"""
from __future__ import annotations

import functools
import math

import torch

from .hashing import rht_signs

ALLOWED_TILES = tuple(2**i for i in range(3, 12))  # 8 .. 2048
MIN_DIVIDING_TILE = 32
#: Padding the tile plan may add beyond the lattice's own (rounding ``n`` up to a multiple of 8), as a
#: fraction of ``n``: a larger tile is taken only while the padding stays within it.
PAD_FRACTION = 1.0 / 128
_MATMUL_MAX = 256


def _round_up(n: int, h: int) -> int:
    return -(-n // h) * h


def plan_tiles(n: int, max_tile: int, multiple: int = 8) -> tuple[int, int]:
    """Choose the tile size ``H`` and padded length ``n_pad`` for a row of ``n`` coordinates.

    ``H`` is the largest power of two in ``[8, max_tile]`` whose padding ``n_pad − n`` (``n_pad`` = ``n``
    rounded up to a multiple of ``H``) is at most ``max(n8 − n, ⌊n · PAD_FRACTION⌋)``, with ``n8`` = ``n``
    rounded up to a multiple of 8 (the padding no plan can avoid for an 8-dimensional lattice). So the padding
    is at most ~0.8% of the row plus the 7 coordinates E8 itself needs: 1000 → (8, 1000), 777 → (16, 784),
    4095 → (256, 4096) at ``max_tile`` 256, 3000 → (64, 3008). A smaller padding is never traded for a
    tile below the one a larger padding allows only up to that bound, and the chosen tile reproduces
    itself: ``plan_tiles(n, H) == (H, n_pad)`` (the stored tile is enough to re-plan; see
    :func:`legacy_plan_tiles` for the plan of format-1 blobs). ``n_pad`` is a multiple of ``multiple``
    (the lattice dimension, ≤ 8).
    """
    _check_plan_args(n, max_tile)
    slack = max(_round_up(n, 8) - n, int(n * PAD_FRACTION))
    h = max_tile
    while h > 8 and _round_up(n, h) - n > slack:
        h //= 2
    n_pad = _round_up(n, h)
    assert n_pad % multiple == 0
    return h, n_pad


def legacy_plan_tiles(n: int, max_tile: int) -> tuple[int, int]:
    """The tile plan of the first encoder (still valid to decode): the largest power of two ``≤ max_tile``
    dividing ``n`` when it is at least ``min(32, max_tile)``, else ``n`` zero-padded to a multiple of
    ``min(max_tile, next_pow2(n))`` (at least 8) — up to 3× the row for short rows, and 2.4% for 1000."""
    _check_plan_args(n, max_tile)
    low = n & -n  # largest power of two dividing n
    h = min(low, max_tile)
    if h >= min(MIN_DIVIDING_TILE, max_tile):  # max_tile ≥ 8, so h ≥ 8 here
        return h, n
    h = min(max_tile, max(8, 1 << (n - 1).bit_length()))
    return h, _round_up(n, h)


def decodable_tiles(n: int) -> set[int]:
    """Every tile an encoder (current or legacy plan, any allowed maximum) chooses for rows of ``n``."""
    return {plan(n, t)[0] for t in ALLOWED_TILES for plan in (plan_tiles, legacy_plan_tiles)}


def _check_plan_args(n: int, max_tile: int) -> None:
    if n <= 0:
        raise ValueError(f"cannot plan RHT tiles for a row of length {n}")
    if max_tile not in ALLOWED_TILES:
        raise ValueError(f"tile must be a power of two in {ALLOWED_TILES}, got {max_tile}")


@functools.lru_cache(maxsize=16)
def _hadamard(h: int, device_type: str, device_index) -> torch.Tensor:
    m = torch.ones(1, 1, dtype=torch.float32)
    while m.shape[0] < h:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    dev = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    return m.to(dev)


def fwht(x: torch.Tensor, h: int) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester order) of each tile of ``h`` along the last axis.

    x: (..., n) float32 with n % h == 0. Returns (..., n) float32. Tiles larger than 256 are factored as
    a Kronecker product (H_a ⊗ H_256) so every step is a small dense matmul.
    """
    shape = x.shape
    dev = x.device
    if h <= _MATMUL_MAX:
        m = _hadamard(h, dev.type, dev.index)
        return (x.reshape(-1, h) @ m).reshape(shape)
    a = h // _MATMUL_MAX
    m = _hadamard(_MATMUL_MAX, dev.type, dev.index)
    ma = _hadamard(a, dev.type, dev.index)
    y = (x.reshape(-1, a, _MATMUL_MAX) @ m)  # inner factor
    y = ma @ y  # outer factor mixes the a sub-tiles: (a, a) @ (T, a, 256)
    return y.reshape(shape)


def rht(x: torch.Tensor, seed: int, key: int | str, tile: int) -> torch.Tensor:
    """Forward RHT along the last axis. x: (..., n_pad) float; returns float32 (..., n_pad).

    ``n_pad`` must be a multiple of ``tile`` (pad first: :func:`pad_last`).
    """
    n = x.shape[-1]
    if n % tile:
        raise ValueError(f"last dimension {n} is not a multiple of the tile {tile}; pad it first")
    d = rht_signs(n, seed, key, device=x.device)
    return fwht(x.to(torch.float32) * d, tile) * (1.0 / math.sqrt(tile))


def inverse_rht(y: torch.Tensor, seed: int, key: int | str, tile: int) -> torch.Tensor:
    """Inverse of :func:`rht`. y: (..., n_pad) float; returns float32 (..., n_pad)."""
    n = y.shape[-1]
    if n % tile:
        raise ValueError(f"last dimension {n} is not a multiple of the tile {tile}")
    d = rht_signs(n, seed, key, device=y.device)
    return fwht(y.to(torch.float32), tile) * (1.0 / math.sqrt(tile)) * d


def pad_last(x: torch.Tensor, n_pad: int) -> torch.Tensor:
    """Zero-pad the last axis of ``x`` to ``n_pad``."""
    n = x.shape[-1]
    if n == n_pad:
        return x
    return torch.nn.functional.pad(x, (0, n_pad - n))


def excess_kurtosis(x: torch.Tensor) -> float:
    """Excess kurtosis of all entries of ``x`` (0 for a Gaussian)."""
    v = x.double().flatten()
    v = v - v.mean()
    m2 = (v * v).mean()
    return float((v**4).mean() / (m2 * m2) - 3.0)
