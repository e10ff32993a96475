"""Simulated low-precision matmul operands: FP8 e4m3, NVFP4 and MXFP4 (OCP Microscaling v1.0).

Each ``fake_quant_*`` function rounds a float32 matrix to the values representable in the format and returns
them dequantized in float32 (same shape), so ``F.linear`` of two fake-quantized operands in float32 equals
what a native low-precision GEMM with float32 accumulation computes, up to the accumulation order. They are
the torch references of future native paths; on this build every device uses them.

Legend: R rows (tokens or output features), K the contraction length (a multiple of the block; pad first).

- FP8 e4m3 (``torch.float8_e4m3fn``): one float32 scale per row, ``amax / 448``.
- NVFP4: FP4 e2m1 values (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}) in blocks of 16 along K; each block has an e4m3
  scale, and each row a float32 second-level scale ``amax_row / (6 · 448)`` that brings the block scales
  into the e4m3 range.
- MXFP4: FP4 e2m1 values in blocks of 32 along K with an e8m0 (power-of-two) shared scale
  ``2^(floor(log2(amax_block)) − 2)`` (2 = emax of e2m1); values beyond ±6 after scaling saturate.

All rounding is round-to-nearest-even; all-zero rows and blocks stay zero.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32

_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # index parity = mantissa bit


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest FP4 e2m1 value (ties to even mantissa), saturating at ±6."""
    grid = torch.tensor(_E2M1_GRID, dtype=torch.float32, device=x.device)
    mids = (grid[1:] + grid[:-1]) / 2
    a = x.abs().clamp(max=E2M1_MAX)
    idx = torch.bucketize(a, mids)  # a == mids[j] → j (the lower neighbour)
    tie = (idx < mids.numel()) & (a == mids[idx.clamp(max=mids.numel() - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)  # a tie goes to the even-mantissa neighbour
    return torch.copysign(grid[idx], x)


def _safe(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def fake_quant_fp8(x: torch.Tensor) -> torch.Tensor:
    """x: float32 (R, K) → float32 (R, K) rounded to e4m3 with a per-row scale ``amax / 448``."""
    s = _safe(x.abs().amax(-1, keepdim=True) / E4M3_MAX)
    q = (x / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    return q * s


def fake_quant_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """x: float32 (R, K), K % 16 == 0 → float32 (R, K) in NVFP4 (e2m1 values, e4m3 block scales)."""
    r, k = x.shape
    g = _safe(x.abs().amax(-1, keepdim=True) / (E2M1_MAX * E4M3_MAX)).unsqueeze(-1)  # (R, 1, 1)
    xb = x.reshape(r, k // NVFP4_BLOCK, NVFP4_BLOCK)
    bs = (xb.abs().amax(-1, keepdim=True) / E2M1_MAX / g).clamp(max=E4M3_MAX)
    scale = bs.to(torch.float8_e4m3fn).to(torch.float32) * g  # (R, K/16, 1)
    q = round_e2m1(xb / _safe(scale))
    return (q * scale).reshape(r, k)


def fake_quant_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """x: float32 (R, K), K % 32 == 0 → float32 (R, K) in MXFP4 (e2m1 values, e8m0 block scales)."""
    r, k = x.shape
    xb = x.reshape(r, k // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    _, e = torch.frexp(amax)  # amax = m · 2^e, m ∈ [0.5, 1) → floor(log2 amax) = e − 1
    shared = torch.where(amax > 0, e - 1 - 2, torch.zeros_like(e)).clamp(-127, 127)
    scale = torch.ldexp(torch.ones_like(amax), shared)
    q = round_e2m1(xb / scale)
    return (q * scale).reshape(r, k)


#: format name → (fake quantizer, block length along K that K must be padded to)
FAKE_QUANT = {
    "fp8": (fake_quant_fp8, 1),
    "nvfp4": (fake_quant_nvfp4, NVFP4_BLOCK),
    "mxfp4": (fake_quant_mxfp4, MXFP4_BLOCK),
}
