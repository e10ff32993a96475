"""``encode`` / ``decode``: the codec pipeline end to end.

encode: ``w → rows (R, n) → zero-pad to n_pad → RHT per tile → divide by the row RMS (stored)
→ × α → nearest lattice point → strip → Rice``. α comes from the calibration table and is refined on
the real coded length so that ``total_bits / numel ≤ bps``.
"""
from __future__ import annotations

import math
import warnings

import torch

from .config import SCALE_DTYPES, CodecConfig
from .errors import HQFormatError
from .format import EncodedTensor, header_bytes
from .hashing import key_to_u32
from .lattice import alpha_for_snr, nearest, to_physical
from .rate import alpha_for_rate
from .rht import inverse_rht, pad_last, plan_tiles, rht
from .rice import _num_blocks, decode_stream, encode_stream, stream_bits
from .strip import NUM_STREAMS, stream_lengths, strip, unstrip

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SAMPLE_SYMBOLS = 2**20  # symbols used to refine α before the full encode
_MAX_ABS_CODE = 2**27
_MIN_PAYLOAD_RATE = 1.1  # a Rice code spends at least one bit per symbol


class RateBudgetWarning(UserWarning):
    """The fixed overhead of a tiny tensor does not fit in the requested rate."""


def _validate(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {w.dtype}; expected one of {[str(d) for d in SUPPORTED_DTYPES]}")
    if w.numel() == 0:
        raise ValueError(f"cannot encode an empty tensor of shape {tuple(w.shape)}")
    if w.dim() > 8:
        raise ValueError(f"tensors of more than 8 dimensions are not supported (got {w.dim()})")
    if any(d >= 2**32 for d in w.shape):
        raise ValueError(f"dimension too large: {tuple(w.shape)}")
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        nan, inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
        raise ValueError(f"tensor contains {nan} NaN and {inf} Inf values; refusing to encode")


def rotated_rows(w: torch.Tensor, tile: int, seed: int, key: int | str) -> tuple[torch.Tensor, int]:
    """Rows of ``w`` zero-padded and rotated: float32 (R, n_pad), and the tile used."""
    n = w.shape[-1] if w.dim() else 1
    h, n_pad = plan_tiles(n, tile)
    x = pad_last(w.reshape(-1, n).to(torch.float32), n_pad)
    return rht(x, seed, key, h), h


def _fixed_bits(shape, rows: int, lattice: str, n_pad: int, block: int, scale_bytes: int) -> int:
    """Bits of everything except the payload (unary, remainders, escapes): header, scales, ks, offsets."""
    lens = stream_lengths(lattice, rows * n_pad)
    size = header_bytes(len(shape), len(lens)) + rows * scale_bytes
    size += sum(_num_blocks(sn, block) * 5 for sn in lens)  # per block: u8 k, i32 offset
    return 8 * size


def _payload_bits(u: torch.Tensor, lattice: str, alpha: float, block: int) -> int:
    y = nearest(lattice, u * alpha)
    return sum(stream_bits(z, block) for z in strip(lattice, y))


def _refine_alpha(u: torch.Tensor, lattice: str, rate: float, block: int) -> float:
    """α whose payload rate on ``u`` (float32 (r, n_pad), unit-RMS rows) is just under ``rate``.

    Secant iterations in log α on a subsample of rows (the whole tensor when it is small)."""
    rows, n_pad = u.shape
    stride = max(1, math.ceil(rows * n_pad / _SAMPLE_SYMBOLS))
    sample = u[::stride]
    sampled = stride > 1
    target = rate - (0.004 if sampled else 0.0)
    la = math.log2(alpha_for_rate(lattice, max(target, 0.05)))
    r = _payload_bits(sample, lattice, 2.0**la, block) / sample.numel()
    slope = 1.0
    for _ in range(8):
        err = r - target
        if -0.003 <= err <= 0.0:
            break
        la_new = la - err / max(slope, 0.05)
        r_new = _payload_bits(sample, lattice, 2.0**la_new, block) / sample.numel()
        if la_new != la:
            slope = max((r_new - r) / (la_new - la), 0.05)
        la, r = la_new, r_new
    return float(torch.tensor(2.0**la, dtype=torch.float32))


def encode(w: torch.Tensor, cfg: CodecConfig | None = None, key: int | str = 0) -> EncodedTensor:
    """Encode a float tensor.

    Args:
        w: float32/float16/bfloat16/float64 tensor of any non-empty shape. Rows are the leading dims
            flattened; the RHT runs along the last dimension (the contraction axis of a weight).
        cfg: codec configuration (default ``CodecConfig()``: E8 at 4.0 total bps).
        key: layer key mixed into the RHT signs (an int or a name); activations must be rotated with
            the same ``(seed, key)``.

    Returns:
        :class:`EncodedTensor` with ``total_bits / numel ≤ cfg.bps`` whenever the tensor is large enough
        for its fixed overhead (header, one scale per row) to fit; tiny tensors get the lowest-rate
        encoding and a :class:`RateBudgetWarning`.
    """
    cfg = cfg or CodecConfig()
    _validate(w)
    shape = tuple(w.shape)
    lattice = cfg.lattice
    u, h = rotated_rows(w, cfg.tile, cfg.seed, key)
    rows, n_pad = u.shape
    key32 = key_to_u32(key)
    # per-row scale: RMS of the rotated (padded) row, rounded to the stored dtype
    sdt = SCALE_DTYPES[cfg.scale_dtype]
    rms = u.square().mean(1).sqrt().double()
    if not bool(torch.isfinite(rms).all()):  # float32 squares overflowed: redo in float64
        rms = u.double().square().mean(1).sqrt()
    scales = rms.to(sdt)
    sf = scales.to(torch.float64)
    if not torch.isfinite(sf).all() or bool(((rms > 0) & (sf <= 0)).any()):
        raise ValueError(
            f"row scales out of range for {cfg.scale_dtype} (RMS from {float(rms.min()):.3g} to "
            f"{float(rms.max()):.3g}); use CodecConfig(scale_dtype='float32') or 'bfloat16'")
    u = u / torch.where(sf > 0, sf, 1.0).to(torch.float32).unsqueeze(1)
    numel = math.prod(shape)
    fixed = _fixed_bits(shape, rows, lattice, n_pad, cfg.block, scales.element_size())
    meta = {"tile_used": h}
    if cfg.snr_db is not None:
        alpha = float(torch.tensor(alpha_for_snr(lattice, cfg.snr_db), dtype=torch.float32))
        budget = None
    else:
        budget = cfg.bps * numel
        rate = (budget - fixed) / (rows * n_pad)
        if rate < _MIN_PAYLOAD_RATE:
            warnings.warn(
                f"tensor of shape {shape} is too small for {cfg.bps} bps: its fixed overhead alone is "
                f"{fixed / numel:.2f} bits per scalar; spending {cfg.bps} bits per scalar on the payload",
                RateBudgetWarning, stacklevel=2)
            rate = cfg.bps
            budget = None
        alpha = _refine_alpha(u, lattice, rate, cfg.block)
    for attempt in range(12):
        y = nearest(lattice, u * alpha)
        max_abs = int(y.abs().max())
        if max_abs > _MAX_ABS_CODE:
            raise ValueError("lattice integers out of range: the requested rate or SNR is too high")
        streams = [encode_stream(z, cfg.block) for z in strip(lattice, y)]
        et = EncodedTensor(shape, w.dtype, lattice, h, cfg.block, cfg.seed, key32, alpha, cfg.scale_dtype,
                           scales, streams, max_abs <= 127, meta=meta)
        if budget is None or et.total_bits <= budget:
            break
        if attempt == 11:
            warnings.warn(f"tensor of shape {shape}: could not meet {cfg.bps} bps, got {et.bps:.3f}",
                          RateBudgetWarning, stacklevel=2)
            break
        excess = (et.total_bits - budget) / (rows * n_pad)
        alpha = float(torch.tensor(alpha * 2.0 ** -(excess + 0.002), dtype=torch.float32))
    meta["max_abs_code"] = max_abs
    return et


def decode(q: EncodedTensor, out: str = "weight") -> torch.Tensor:
    """Decode an :class:`EncodedTensor`.

    Args:
        out: ``"weight"`` — the reconstruction in the original basis, shape and dtype of the input;
            ``"codes"`` — the lattice integers in the rotated basis, shape ``q.codes_shape``
            (``(*shape[:-1], n_pad)``), int8 when they fit (``q.fits_int8``), else int16/int32;
            ``"rotated"`` — float32 ``p(Y) / α · scale`` in the rotated basis, shape ``q.codes_shape``.
    """
    if out not in ("weight", "codes", "rotated"):
        raise ValueError(f"out must be 'weight', 'codes' or 'rotated', got {out!r}")
    if len(q.streams) != NUM_STREAMS.get(q.lattice, -1):
        raise HQFormatError(f"{q.lattice} needs {NUM_STREAMS.get(q.lattice)} streams, found {len(q.streams)}")
    rows, n_pad = q.rows, q.n_pad
    y = unstrip(q.lattice, [decode_stream(s) for s in q.streams], (rows, n_pad))
    if out == "codes":
        max_abs = int(y.abs().max())
        if q.fits_int8:
            if max_abs > 127:
                raise HQFormatError("codes flagged as int8 but out of range")
            return y.to(torch.int8).reshape(q.codes_shape)
        return y.to(torch.int32 if max_abs > 32767 else torch.int16).reshape(q.codes_shape)
    rot = to_physical(q.lattice, y) * (q.scales.to(torch.float32).unsqueeze(1) / q.alpha)
    if out == "rotated":
        return rot.reshape(q.codes_shape)
    x = inverse_rht(rot, q.seed, q.key, q.tile)[:, : q.n]
    return x.reshape(q.shape).to(q.dtype)
