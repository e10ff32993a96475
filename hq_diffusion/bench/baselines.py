"""Reference quantizers the codec is compared against, with honest total rates.

Every function returns ``(w_hat, total_bits)`` where ``total_bits`` counts the codes *and* the side
information (scales, zero points) at the dtype they would be stored in.

- :func:`rtn_groupwise` — round-to-nearest int-b, asymmetric (min/max) per group of 128 along a row,
  fp16 scale and fp16 minimum: ``b + 32/128`` bits per weight.
- :func:`normal_float` — NF-b: for b=4 the real NF4 codebook (the 16 levels bitsandbytes and the QLoRA paper
  publish, :data:`NF4_LEVELS`), for other b the same construction; absmax scale per block of 64 in fp16:
  ``b + 16/64`` bits per weight (bitsandbytes itself stores the absmax in fp32: ``b + 32/64``; its own
  numbers are in ``hq-diffusion bench peers``).
- :func:`higgs_like` — after our RHT, a 2-D vector quantizer whose 2**(2b) points are MSE-optimal for a
  standard Gaussian, one fp16 RMS scale per 1024 weights: ``b + 16/1024`` bits per weight. Fixed-rate: no
  entropy coding. The grids are converged Lloyd grids trained once (:func:`train_gaussian_grid_2d`, recipe
  and seed stored beside the points) and loaded offline from ``assets/higgs_grids_2d.json``.
"""
from __future__ import annotations

import functools
import json
import math
from importlib import resources

import numpy as np
import torch

from hq_diffusion.codec import inverse_rht, rht
from hq_diffusion.codec.rht import plan_tiles
from hq_diffusion.eval.peers import rtn_groupwise  # noqa: F401  (the RTN peer lives with the quality sweep)


#: The NF4 codebook as published by QLoRA (Dettmers et al., 2023, appendix E) and used by bitsandbytes
#: (``quant_type="nf4"``): 7 negative levels, an exact zero, 8 positive levels, in [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: The quantile offset of the NF construction (the mean of 1 - 1/(2·15) and 1 - 1/(2·16), as QLoRA sets it).
NF_OFFSET = 0.9677083


@functools.lru_cache(maxsize=8)
def nf_levels(bits: int) -> torch.Tensor:
    """2**bits normal-float levels in [-1, 1] with an exact zero. float32 (2**bits,).

    QLoRA's construction: 2**(b-1) positive levels at the normal quantiles of ``linspace(NF_OFFSET, 0.5, ·)``,
    2**(b-1) - 1 negative ones likewise, zero, all divided by the largest. For b = 4 this is
    :data:`NF4_LEVELS` to float32 precision (tests/test_peers.py checks it)."""
    if bits < 2:
        raise ValueError(f"nf_levels: bits must be >= 2, got {bits}")
    icdf = torch.distributions.Normal(0.0, 1.0).icdf
    half = 2 ** (bits - 1)
    pos = icdf(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -icdf(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    lv = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    lv = torch.sort(lv / lv.abs().max()).values
    return lv.float()


def normal_float(w: torch.Tensor, bits: int = 4, block: int = 64) -> tuple[torch.Tensor, int]:
    """w: float (R, C) with numel % block == 0. Returns (float32 like w, total bits)."""
    x = w.float().reshape(-1, block)
    absmax = x.abs().amax(-1, keepdim=True).half().float().clamp_min(1e-8)
    lv = nf_levels(bits)
    mid = (lv[1:] + lv[:-1]) / 2
    idx = torch.bucketize(x / absmax, mid)
    w_hat = (lv[idx] * absmax).reshape(w.shape)
    return w_hat, w.numel() * bits + (w.numel() // block) * 16


GRID_ASSET = "higgs_grids_2d.json"


@functools.lru_cache(maxsize=8)
def gaussian_grid_2d(bits_per_dim: int) -> torch.Tensor:
    """The converged MSE-optimal 2-D codebook of 2**(2·bits) points for N(0, I₂), from the asset. float32 (P, 2).

    Raises ``KeyError`` naming the asset when it holds no grid for ``bits_per_dim``."""
    data = json.loads(resources.files("hq_diffusion.assets").joinpath(GRID_ASSET).read_text("utf-8"))
    grids = data["grids"]
    if str(bits_per_dim) not in grids:
        raise KeyError(f"{GRID_ASSET} has no grid for {bits_per_dim} bits per dimension (has {sorted(grids)})")
    return torch.tensor(grids[str(bits_per_dim)]["points"], dtype=torch.float32)


def gaussian_quadrature_2d(n: int = 512, half_width: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoint quadrature of N(0, I₂) on an n×n grid over [-half_width, half_width]²: points float64
    (n², 2) and weights float64 (n²,) summing to 1."""
    h = 2 * half_width / n
    ax = (torch.arange(n, dtype=torch.float64) + 0.5) * h - half_width
    px = torch.exp(-ax.square() / 2)
    px = px / px.sum()
    pts = torch.cartesian_prod(ax, ax)
    return pts, torch.outer(px, px).reshape(-1)


def lloyd_step(cb: torch.Tensor, pts: torch.Tensor, wts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One weighted Lloyd iteration. cb float (P, 2), pts float64 (M, 2), wts float64 (M,).

    Returns (new codebook float64 (P, 2), MSE per dimension of ``cb`` before the step)."""
    cb = cb.double()
    idx = _nearest_rows(pts, cb)
    mse = float((wts * (pts - cb[idx]).square().sum(1)).sum()) / 2
    s0 = torch.zeros(cb.shape[0], dtype=torch.float64).index_add_(0, idx, wts)
    s1 = torch.zeros_like(cb).index_add_(0, idx, pts * wts[:, None])
    new = torch.where(s0[:, None] > 0, s1 / s0.clamp_min(1e-300)[:, None], cb)
    return new, mse


def grid_mse(cb: torch.Tensor, pts: torch.Tensor, wts: torch.Tensor) -> float:
    """MSE per dimension of codebook ``cb`` (P, 2) on the quadrature ``pts``/``wts``."""
    return lloyd_step(cb, pts, wts)[1]


def train_gaussian_grid_2d(bits_per_dim: int, n: int = 512, half_width: float = 6.0, seed: int = 0,
                           tol: float = 1e-6, max_iters: int = 400) -> tuple[torch.Tensor, int, float]:
    """Train the asset's grid: Lloyd on the quadrature of N(0, I₂) (:func:`gaussian_quadrature_2d`), started
    from the product grid of normal quantiles ``(i + 0.5) / 2**bits`` plus N(0, (0.05·spacing)²) jitter
    (``numpy.random.default_rng(seed)``, spacing = the two central quantiles' distance), until one iteration
    changes the MSE by less than ``tol`` (relative).

    Returns (codebook float64 (4**bits, 2), iterations, MSE per dimension). Minutes for 5 bits/dim."""
    side = 2**bits_per_dim
    q = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(side, dtype=torch.float64) + 0.5) / side)
    jitter = np.random.default_rng(seed).normal(0, 0.05 * float(q[side // 2] - q[side // 2 - 1]), (side * side, 2))
    cb = torch.cartesian_prod(q, q) + torch.from_numpy(jitter)
    pts, wts = gaussian_quadrature_2d(n, half_width)
    prev = None
    for it in range(max_iters):
        cb, mse = lloyd_step(cb, pts, wts)
        if prev is not None and (prev - mse) / mse < tol:
            break
        prev = mse
    return cb, it + 1, mse


def _nearest_rows(x: torch.Tensor, cb: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Exact nearest codebook row for each row of x (float (M, 2), same dtype as cb); int64 (M,)."""
    c2 = cb.square().sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        out[s:s + chunk] = (c2 - 2 * xs @ cb.T).argmin(1)
    return out


def higgs_like(w: torch.Tensor, bits: int, group: int = 1024, seed: int = 0) -> tuple[torch.Tensor, int]:
    """w: float (R, C), C even and a whole number of RHT tiles (no padding). Each row is cut in groups of the
    largest even divisor of C up to ``group`` (1024 for the usual widths), one float16 scale per group.
    Returns (float32 (R, C), total bits)."""
    r, c = w.shape
    tile, n_pad = plan_tiles(c, 256)
    if n_pad != c or c % 2:
        raise ValueError(f"higgs_like: {c} columns need padding to {n_pad} (or are odd); pass a width the RHT "
                         "tiles exactly")
    group = max(g for g in range(2, min(group, c) + 1, 2) if c % g == 0)
    u = rht(w.float(), seed, "higgs", tile)
    g = u.reshape(r, c // group, group)
    s = g.square().mean(-1, keepdim=True).sqrt().half().float().clamp_min(1e-8)
    cb = gaussian_grid_2d(bits)
    pairs = (g / s).reshape(-1, 2)
    u_hat = (cb[_nearest_rows(pairs, cb)].reshape(g.shape) * s).reshape(r, c)
    w_hat = inverse_rht(u_hat, seed, "higgs", tile)
    return w_hat, w.numel() * bits + (w.numel() // group) * 16


def snr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    w, w_hat = w.double(), w_hat.double()
    return 10 * math.log10(float(w.square().sum()) / float((w - w_hat).square().sum()))
