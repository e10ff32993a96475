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


def quadrature_axis(n: int = 1024, half_width: float = 6.0) -> torch.Tensor:
    """Midpoints of n equal cells over [-half_width, half_width]: float64 (n,), the axis of
    :func:`gaussian_quadrature_2d`."""
    return (torch.arange(n, dtype=torch.float64) + 0.5) * (2 * half_width / n) - half_width


def gaussian_quadrature_2d(n: int = 512, half_width: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoint quadrature of N(0, I₂) on an n×n grid over [-half_width, half_width]²: points float64
    (n², 2) (``cartesian_prod(quadrature_axis(n, half_width), …)``) and weights float64 (n²,) summing to 1."""
    ax = quadrature_axis(n, half_width)
    px = torch.exp(-ax.square() / 2)
    px = px / px.sum()
    pts = torch.cartesian_prod(ax, ax)
    return pts, torch.outer(px, px).reshape(-1)


def lloyd_step(cb: torch.Tensor, pts: torch.Tensor, wts: torch.Tensor,
               axis: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """One weighted Lloyd iteration. cb float (P, 2), pts float64 (M, 2), wts float64 (M,); ``axis``: float64 (n,)
    when ``pts`` is the product grid ``cartesian_prod(axis, axis)`` (M = n²), which allows the exact binned
    nearest search of :func:`_nearest_on_grid` instead of the dense one.

    Returns (new codebook float64 (P, 2), MSE per dimension of ``cb`` before the step)."""
    cb = cb.double()
    idx = _nearest_rows(pts, cb) if axis is None else _nearest_on_grid(axis, cb)
    mse = float((wts * (pts - cb[idx]).square().sum(1)).sum()) / 2
    s0 = torch.zeros(cb.shape[0], dtype=torch.float64).index_add_(0, idx, wts)
    s1 = torch.zeros_like(cb).index_add_(0, idx, pts * wts[:, None])
    new = torch.where(s0[:, None] > 0, s1 / s0.clamp_min(1e-300)[:, None], cb)
    return new, mse


def grid_mse(cb: torch.Tensor, pts: torch.Tensor, wts: torch.Tensor) -> float:
    """MSE per dimension of codebook ``cb`` (P, 2) on the quadrature ``pts``/``wts``."""
    return lloyd_step(cb, pts, wts)[1]


def train_gaussian_grid_2d(bits_per_dim: int, n: int = 1024, half_width: float = 6.0, seed: int = 0,
                           tol: float = 1e-5, max_iters: int = 2000,
                           progress: bool = False) -> tuple[torch.Tensor, int, float]:
    """Train the asset's grid: Lloyd on the n×n quadrature of N(0, I₂) (:func:`gaussian_quadrature_2d`, exact
    nearest codewords by :func:`_nearest_on_grid`), started from ``4**bits`` points drawn from N(0, 2·I₂)
    (``numpy.random.default_rng(seed)``; the high-resolution optimal point density of a 2-D quantizer is
    ∝ p^(1/2), i.e. N(0, 2·I₂) for a standard Gaussian), until one iteration lowers the MSE by less than
    ``tol`` (relative) or after ``max_iters`` iterations.

    A product grid of normal quantiles (the first recipe) is a poor start: Lloyd keeps its square cells and
    stops in a local optimum 0.7 dB worse at 5 bits/dim than this start reaches (BENCHMARKS.md §21).

    Returns (codebook float64 (4**bits, 2), iterations, MSE per dimension on the quadrature). Tens of minutes
    for 5 bits/dim on a shared 2-core CPU."""
    from tqdm import tqdm

    cb = torch.from_numpy(np.random.default_rng(seed).normal(0.0, math.sqrt(2.0), (4**bits_per_dim, 2)))
    pts, wts = gaussian_quadrature_2d(n, half_width)
    axis = quadrature_axis(n, half_width)
    prev = None
    bar = tqdm(range(max_iters), desc=f"Lloyd {bits_per_dim} bit/dim", disable=not progress, leave=False)
    for it in bar:
        cb, mse = lloyd_step(cb, pts, wts, axis)
        if prev is not None:
            bar.set_postfix(snr_db=f"{-10 * math.log10(mse):.4f}", rel=f"{(prev - mse) / mse:.1e}")
            if (prev - mse) / mse < tol:
                break
        prev = mse
    bar.close()
    return cb, it + 1, mse


GRID_RECIPE = ("Lloyd's algorithm on N(0, I2) by midpoint quadrature: {n}x{n} grid on [-{hw}, {hw}]^2 with "
               "Gaussian weights, exact nearest codewords; start: 4**bits points drawn from N(0, 2*I2) "
               "(numpy default_rng seed {seed}); stop when one iteration lowers the MSE by less than {tol:g} "
               "(relative; at most {max_iters} iterations)")


def build_grid_asset(bits: tuple[int, ...] = (3, 4, 5), progress: bool = True, trained: dict | None = None) -> dict:
    """The content of :data:`GRID_ASSET`: each grid trained by :func:`train_gaussian_grid_2d` with its defaults
    (``trained``: ``{bits: (codebook, iterations)}`` already trained with them, to skip the training), its
    iterations, and its MSE per dimension on the training quadrature (of the final points). Points are rounded
    to 7 decimals (float32)."""
    import inspect

    d = {k: v.default for k, v in inspect.signature(train_gaussian_grid_2d).parameters.items()
         if v.default is not inspect.Parameter.empty}
    pts, wts = gaussian_quadrature_2d(d["n"], d["half_width"])
    axis = quadrature_axis(d["n"], d["half_width"])
    grids = {}
    for b in bits:
        cb, iters = (trained or {}).get(b) or train_gaussian_grid_2d(b, progress=progress)[:2]
        cb = torch.tensor([[round(float(v), 7) for v in p] for p in cb.tolist()], dtype=torch.float64)
        mse = lloyd_step(cb, pts, wts, axis)[1]
        grids[str(b)] = {"iterations": int(iters), "mse_per_dim": mse, "points": cb.tolist()}
    return {"about": "Converged-by-criterion 2-D Lloyd grids for N(0, I2), used by hq_diffusion.bench.baselines."
                     "higgs_like; produced by hq_diffusion.bench.baselines.build_grid_asset() (train_gaussian_grid_2d "
                     "with its defaults) for bits 3, 4, 5. mse_per_dim is on the training quadrature; "
                     "-10*log10(mse_per_dim) is the grid's SNR in dB.",
            "recipe": GRID_RECIPE.format(n=d["n"], hw=d["half_width"], seed=d["seed"], tol=d["tol"],
                                         max_iters=d["max_iters"]),
            "grids": grids}


def _nearest_rows(x: torch.Tensor, cb: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """Exact nearest codebook row for each row of x (float (M, 2), same dtype as cb); int64 (M,)."""
    c2 = cb.square().sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        out[s:s + chunk] = (c2 - 2 * xs @ cb.T).argmin(1)
    return out


def _nearest_on_grid(axis: torch.Tensor, cb: torch.Tensor, b: int = 8, rows: int = 8) -> torch.Tensor:
    """Exact nearest codebook row (int64 (n²,), in ``cartesian_prod(axis, axis)`` order) for every point of the
    product grid of ``axis`` (float64 (n,), increasing, n a multiple of ``b``); cb float64 (P, 2).

    The grid is cut into b×b bins. A codeword whose distance to a bin's rectangle exceeds the smallest
    farthest-corner distance of any codeword cannot be nearest to any point of the bin, so each bin only
    compares its points with the remaining candidates (the C closest by rectangle distance, C the largest
    candidate count of any bin): n²·C distances instead of n²·P."""
    n = axis.numel()
    m = n // b
    ends = axis.reshape(m, b)
    lo, hi = ends[:, :1], ends[:, -1:]  # (m, 1) each: the bins' extent along one axis

    def near_far(c):  # (m, P) per-axis distances from each bin's interval to the codewords' coordinate c (P,)
        return (lo - c).clamp_min(0) + (c - hi).clamp_min(0), torch.maximum((c - lo).abs(), (c - hi).abs())

    (nx, fx), (ny, fy) = near_far(cb[:, 0]), near_far(cb[:, 1])
    out = torch.empty(m, b, m, b, dtype=torch.int64)
    for i0 in range(0, m, rows):  # rows of bins at a time: bounded work space
        sl = slice(i0, min(i0 + rows, m))
        dmin = nx[sl, None, :].square() + ny[None, :, :].square()  # (r, m, P)
        thr = (fx[sl, None, :].square() + fy[None, :, :].square()).amin(-1, keepdim=True)
        c = int((dmin <= thr).sum(-1).max())
        cidx = dmin.topk(c, dim=-1, largest=False).indices  # (r, m, C): every candidate of each bin
        dx = (ends[sl, None, :, None, None] - cb[:, 0][cidx][:, :, None, None, :]).square()  # (r, m, b, 1, C)
        dy = (ends[None, :, None, :, None] - cb[:, 1][cidx][:, :, None, None, :]).square()  # (r, m, 1, b, C)
        local = (dx + dy).argmin(-1)  # (r, m, b, b)
        out[sl] = cidx.gather(-1, local.reshape(*local.shape[:2], -1)).reshape(local.shape).permute(0, 2, 1, 3)
    return out.reshape(-1)


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
