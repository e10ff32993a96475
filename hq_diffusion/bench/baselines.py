"""Reference quantizers the codec is compared against, with honest total rates.

Every function returns ``(w_hat, total_bits)`` where ``total_bits`` counts the codes *and* the side
information (scales, zero points) at the dtype they would be stored in.

- :func:`rtn_groupwise` — round-to-nearest int-b, asymmetric (min/max) per group of 128 along a row,
  fp16 scale and fp16 minimum: ``b + 32/128`` bits per weight.
- :func:`normal_float` — NF-b (NF4 for b=4): 2**b levels at normal quantiles with an exact zero, absmax
  scale per block of 64 in fp16: ``b + 16/64`` bits per weight.
- :func:`higgs_like` — after our RHT, a 2-D vector quantizer whose 2**(2b) points are MSE-optimal for a
  standard Gaussian (Lloyd's algorithm on Gaussian samples), one fp16 RMS scale per 1024 weights:
  ``b + 16/1024`` bits per weight. Fixed-rate: no entropy coding.
"""
from __future__ import annotations

import functools
import math

import torch

from hq_diffusion.codec import inverse_rht, rht
from hq_diffusion.codec.rht import plan_tiles
from hq_diffusion.eval.peers import rtn_groupwise  # noqa: F401  (the RTN peer lives with the quality sweep)


@functools.lru_cache(maxsize=8)
def nf_levels(bits: int) -> torch.Tensor:
    """2**bits normal-float levels in [-1, 1] with an exact zero (more positive than negative levels)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    tail = 0.5 * (1 - 1 / (2 * (2**bits)))  # keep the extreme levels off the infinite tails
    pos = normal.icdf(torch.linspace(0.5, 0.5 + tail, 2 ** (bits - 1) + 1, dtype=torch.float64)[1:])
    neg = -normal.icdf(torch.linspace(0.5, 0.5 + tail, 2 ** (bits - 1), dtype=torch.float64)[1:])
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


@functools.lru_cache(maxsize=8)
def gaussian_grid_2d(bits_per_dim: int, samples: int = 2**18, iters: int = 40, seed: int = 0) -> torch.Tensor:
    """MSE-optimal (Lloyd) 2-D codebook of 2**(2·bits) points for N(0, I₂). float32 (P, 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 2, generator=g)
    side = 2**bits_per_dim
    q = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(side, dtype=torch.float64) + 0.5) / side).float()
    cb = torch.cartesian_prod(q, q)
    for _ in range(iters):
        idx = _nearest_rows(x, cb)
        sums = torch.zeros_like(cb).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=cb.shape[0]).unsqueeze(1).float()
        cb = torch.where(counts > 0, sums / counts.clamp_min(1), cb)
    return cb


def _nearest_rows(x: torch.Tensor, cb: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Exact nearest codebook row for each row of x (float32 (M, 2)); int64 (M,)."""
    c2 = cb.square().sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        out[s:s + chunk] = (c2 - 2 * xs @ cb.T).argmin(1)
    return out


def higgs_like(w: torch.Tensor, bits: int, group: int = 1024, seed: int = 0) -> tuple[torch.Tensor, int]:
    """w: float (R, C) with C % group == 0 and C a multiple of 256. Returns (float32 (R, C), total bits)."""
    r, c = w.shape
    tile, n_pad = plan_tiles(c, 256)
    assert n_pad == c and c % group == 0
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
