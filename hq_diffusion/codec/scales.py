"""Row scales: rounding the row RMS to a stored scale format and reading the stored scales back as floats.

Float formats (``"float16"``, ``"bfloat16"``, ``"float32"``) store one value per row, (R,) in that dtype.

``"log8"`` stores one uint8 code per row on a per-tensor uniform grid in the log domain. Its stored section is
uint8 (8 + R,): the grid's float32 ``offset`` and float32 ``step`` (little-endian, 8 bytes), then the R codes.
Code 0 is a row of exact zeros (scale 0); code ``c`` in 1..255 is the scale ``2 ** (offset + step · (c − 1))``
(evaluated in float64, rounded to float32). The encoder puts ``offset`` at log2 of the smallest nonzero row RMS
and spreads the 255 codes up to the largest, so a row's stored scale is within ``2 ** (step / 2)`` of its RMS;
it then normalizes each row by the *stored* scale, so the coarse scale costs (almost) no SNR. A valid grid has
finite ``offset`` and ``step``, ``step ≥ 0``, and every code's scale a normal float32:
``LOG8_LOG2_RANGE[0] ≤ offset`` and ``offset + 254 · step ≤ LOG8_LOG2_RANGE[1]``.
"""
from __future__ import annotations

import math

import torch

from .errors import HQFormatError, HQRangeError

#: Stored scale dtype of each scale format (log8: the grid's 8 bytes, then one code per row).
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "log8": torch.uint8}
LOG8_GRID_BYTES = 8  # float32 offset, float32 step
LOG8_CODES = 255  # nonzero codes 1..255
#: log2 range every log8 code must decode into: normal, finite float32 scales.
LOG8_LOG2_RANGE = (-126.0, 127.0)


def scale_count(scale_dtype: str, rows: int) -> int:
    """Elements (of ``SCALE_DTYPES[scale_dtype]``) in the stored scale section of ``rows`` rows."""
    return rows + LOG8_GRID_BYTES if scale_dtype == "log8" else rows


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def log8_grid(stored: torch.Tensor) -> tuple[float, float]:
    """(offset, step) of a log8 scale section (uint8 (8 + R,)), read on the host."""
    off, step = stored[:LOG8_GRID_BYTES].cpu().view(torch.float32).tolist()
    return off, step


def check_log8_grid(off: float, step: float, what: str = "log8 row scales") -> None:
    """HQFormatError unless the grid is valid (see the module docstring)."""
    lo, hi = LOG8_LOG2_RANGE
    if not (math.isfinite(off) and math.isfinite(step) and step >= 0.0):
        raise HQFormatError(f"{what}: invalid grid offset {off!r} / step {step!r} (both must be finite, step ≥ 0)")
    if not (lo <= off and off + (LOG8_CODES - 1) * step <= hi):
        raise HQFormatError(f"{what}: grid offset {off!r} / step {step!r} decodes outside 2**{lo:g}..2**{hi:g}")


def _log8_values(codes: torch.Tensor, off: torch.Tensor | float, step: torch.Tensor | float) -> torch.Tensor:
    """float32 scales of uint8 ``codes`` (R,) on the grid (float64 math; code 0 → 0)."""
    c = codes.to(torch.float64)
    v = torch.exp2(off + step * (c - 1.0)).to(torch.float32)
    return torch.where(codes == 0, torch.zeros_like(v), v)


def scale_values(scales: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """float32 (R,) row scales of a stored scale section (``scales``: (R,) float for a float format, uint8
    (8 + R,) for ``"log8"``), on its device and without a host read (usable while compiling)."""
    if scale_dtype != "log8":
        return scales.to(torch.float32)
    grid = scales[:LOG8_GRID_BYTES].view(torch.float32).to(torch.float64)
    return _log8_values(scales[LOG8_GRID_BYTES:], grid[0], grid[1])


def _range_error(what, scale_dtype, rms, bad, kind):
    rows = bad.nonzero().squeeze(1)
    lo, hi = float(rms[bad].min()), float(rms[bad].max())
    return HQRangeError(
        f"{what}: {rows.numel()} row(s) (first: row {int(rows[0])}) have an RMS of {lo:.3g} to {hi:.3g}, "
        f"{kind} for {scale_dtype} row scales (a row of exact zeros is fine; a nonzero row must have a "
        f"representable scale); use scale_dtype='float32' (or 'bfloat16')")


def round_scales(rms: torch.Tensor, scale_dtype: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row RMS (float64 (R,)) rounded to ``scale_dtype``: (stored section — (R,) in the float dtype, or uint8
    (8 + R,) for ``"log8"`` — and the decoded scales as float64 (R,), what the decoder multiplies by). A row of
    exact zeros gets scale 0 (it decodes to exact zeros); any other row whose RMS the format rounds to 0 or to
    Inf, or (log8) outside :data:`LOG8_LOG2_RANGE`, raises :class:`HQRangeError`."""
    if scale_dtype == "log8":
        return _round_log8(rms, what)
    scales = rms.to(SCALE_DTYPES[scale_dtype])
    sf = scales.to(torch.float64)
    bad = ~torch.isfinite(sf) | ((rms > 0) & (sf <= 0))
    if bool(bad.any()):
        kind = "too large" if bool(torch.isinf(sf[bad]).any()) else "too small"
        raise _range_error(what, scale_dtype, rms, bad, kind)
    return scales, sf


def _round_log8(rms: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    nz = rms > 0
    lg = torch.log2(torch.where(nz, rms, torch.ones_like(rms)))
    lo, hi = LOG8_LOG2_RANGE
    bad = nz & ((lg < lo) | (lg > hi - 1.0))  # 1 octave of margin: float32 rounding of the grid stays inside
    if bool(bad.any()):
        raise _range_error(what, "log8", rms, bad, "too large" if bool((nz & (lg > hi - 1.0)).any()) else "too small")
    if bool(nz.any()):
        lmin, lmax = float(lg[nz].min()), float(lg[nz].max())
        off = _f32(lmin)
        step = _f32(max(lmax - off, 0.0) / (LOG8_CODES - 1))
    else:
        off, step = 0.0, 0.0
    check_log8_grid(off, step, what)  # holds by construction; a failure here is a bug, not bad input
    if step > 0:
        idx = torch.round((lg - off) / step).clamp_(0, LOG8_CODES - 1)
    else:
        idx = torch.zeros_like(lg)
    codes = torch.where(nz, idx + 1.0, torch.zeros_like(idx)).to(torch.uint8)
    grid = torch.tensor([off, step], dtype=torch.float32).view(torch.uint8).to(rms.device)
    stored = torch.cat([grid, codes])
    return stored, _log8_values(codes, off, step).to(torch.float64)
