"""``encode`` / ``decode``: the codec pipeline end to end.

encode: ``w → rows (R, n) → zero-pad to n_pad → RHT per tile → divide by the row RMS (stored)
→ × α → nearest lattice point → strip → Rice or rANS`` (``CodecConfig.resolved_coder()``). α comes from the
calibration table and is refined on the real coded length so that ``total_bits / numel ≤ bps``.
"""
from __future__ import annotations

import math
import warnings

import torch

from .config import CodecConfig
from .errors import HQFormatError, HQRangeError
from . import rans
from ._np import select
from .format import ALPHA_RANGE, EncodedTensor, header_bytes, rans_contexts
from .hashing import key_to_u32
from .lattice import alpha_for_snr, nearest, to_physical
from .rate import alpha_for_rate
from .scales import round_scales, scale_values
from .rht import inverse_rht, pad_last, plan_tiles, rht
from .rice import _num_blocks, decode_stream, encode_stream, stream_bits
from .strip import NUM_STREAMS, stream_lengths, strip, unstrip

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SAMPLE_SYMBOLS = 2**20  # symbols used to refine α before the full encode
_MAX_ABS_CODE = 2**27
_BLOCK_ELEMS = 1 << 20  # coordinates per row block of the encoder's full-tensor passes (4 MiB of float32)
_MIN_PAYLOAD_RATE = 1.1  # a Rice code spends at least one bit per symbol
#: Largest ``|w|`` the codec encodes: the float32 rotation of a tile of up to 2048 values stays finite below
#: it (an unnormalized Hadamard sum grows by at most the tile size). Larger magnitudes raise HQRangeError.
MAX_ABS_VALUE = 2.0**116


class RateBudgetWarning(UserWarning):
    """The fixed overhead of a tiny tensor does not fit in the requested rate."""


def _what(key, shape) -> str:
    """How messages name the tensor: its key when it is a name (``quantize`` passes the layer name)."""
    return f"tensor {key!r} of shape {tuple(shape)}" if isinstance(key, str) else f"tensor of shape {tuple(shape)}"


def _validate(w: torch.Tensor, what: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{what}: unsupported dtype {w.dtype}; expected one of "
                         f"{[str(d) for d in SUPPORTED_DTYPES]}")
    if w.numel() == 0:
        raise ValueError(f"cannot encode an empty tensor of shape {tuple(w.shape)}")
    if w.dim() > 8:
        raise ValueError(f"tensors of more than 8 dimensions are not supported (got {w.dim()})")
    if any(d >= 2**32 for d in w.shape):
        raise ValueError(f"dimension too large: {tuple(w.shape)}")
    amax = float(w.abs().amax())  # one pass: NaN propagates, Inf is Inf
    if not math.isfinite(amax):
        nan, inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
        raise ValueError(f"{what} contains {nan} NaN and {inf} Inf values; refusing to encode")
    if amax > MAX_ABS_VALUE:
        raise HQRangeError(f"{what}: largest |value| {amax:.4g} exceeds the codec's range "
                           f"{MAX_ABS_VALUE:.4g} (2**116; its float32 rotation would overflow)")


def rotated_rows(w: torch.Tensor, tile: int, seed: int, key: int | str) -> tuple[torch.Tensor, int]:
    """Rows of ``w`` zero-padded and rotated: float32 (R, n_pad), and the tile used."""
    n = w.shape[-1] if w.dim() else 1
    h, n_pad = plan_tiles(n, tile)
    x = pad_last(w.reshape(-1, n).to(torch.float32), n_pad)
    return rht(x, seed, key, h), h


def _row_blocks(rows: int, n_pad: int) -> list[slice]:
    """Row slices of at least :data:`_BLOCK_ELEMS` coordinates each (a remainder joins the last block; one
    slice for a small tensor): the full-tensor passes of :func:`encode` run over them so that their
    temporaries stay one block in size. Every pass is row-local, so the result does not depend on the
    blocking. A block's temporaries (4 MiB of float32 each) stay in the CPU caches far better than the former
    32 MiB blocks did: a 4096×4096 layer encodes 1.35–1.7× faster with a work space of 0.55–0.71 times the
    former (BENCHMARKS.md §27). glibc's malloc keeps such freed blocks in its heap for the next block rather
    than unmapping them; the callers that encode many layers give them back after large layers
    (``integrations.memory``)."""
    per = -(-_BLOCK_ELEMS // n_pad)
    starts = list(range(0, rows, per))
    if len(starts) > 1 and rows - starts[-1] < per:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, starts[1:] + [rows])]


class _UnitRows:
    """Rotated rows of ``w`` divided by their stored scale, float32 (R, n_pad), and the row scales.

    A small tensor (one row block) or ``hold=True`` materializes them once (``self.u``, the only full-size
    float32 buffer of the encoder). Otherwise nothing full-size is kept: a first pass over the row blocks
    measures the row RMS, and :meth:`rows` recomputes any block of unit rows from ``w`` when a pass needs it
    (the rotation is row-local, so a recomputed block equals the same rows of the materialized tensor bit for
    bit). This keeps the encoder's float work space at one row block instead of 4 bytes per coordinate.

    Attributes: ``shape`` (R, n_pad), ``tile`` (the tile used), ``scales`` (R,) in the scale dtype,
    ``u`` (the materialized rows or None)."""

    def __init__(self, w: torch.Tensor, cfg: CodecConfig, key: int | str, what: str, hold: bool = False):
        n = w.shape[-1] if w.dim() else 1
        h, n_pad = plan_tiles(n, cfg.tile)
        self._w2, self._seed, self._key, self.tile = w.reshape(-1, n), cfg.seed, key, h
        rows = self._w2.shape[0]
        self.shape = (rows, n_pad)
        blocks = _row_blocks(rows, n_pad)
        if len(blocks) == 1:  # small tensor: one pass, no extra buffer
            u = self._rotate(slice(None))
            self.scales, sf = _row_scales(u, cfg.scale_dtype, what)
            self.u = u.div_(torch.where(sf > 0, sf, 1.0).to(torch.float32).unsqueeze(1))
            return
        u = torch.empty(rows, n_pad, dtype=torch.float32, device=w.device) if hold else None
        rms = torch.empty(rows, dtype=torch.float64, device=w.device)
        for sl in blocks:
            ub = self._rotate(sl)
            rms[sl] = _row_rms(ub)
            if u is not None:
                u[sl] = ub
            del ub
        self.scales, sf = _scales_of(rms, cfg.scale_dtype, what)
        self._div = torch.where(sf > 0, sf, 1.0).to(torch.float32).unsqueeze(1)
        if u is not None:
            for sl in blocks:
                u[sl].div_(self._div[sl])
        self.u = u

    def _rotate(self, sl) -> torch.Tensor:
        return rht(pad_last(self._w2[sl].to(torch.float32), self.shape[1]), self._seed, self._key, self.tile)

    def rows(self, sl: slice) -> torch.Tensor:
        """float32 (r, n_pad): the unit rows ``sl`` (a view of ``u`` when held, else recomputed)."""
        if self.u is not None:
            return self.u[sl]
        return self._rotate(sl).div_(self._div[sl])


def _unit_rows(w: torch.Tensor, cfg: CodecConfig, key: int | str, what: str):
    """Rotated rows of ``w`` divided by their stored scale: one float32 (R, n_pad) tensor.

    Returns (u, tile, scales (R,) in the scale dtype)."""
    ur = _UnitRows(w, cfg, key, what, hold=True)
    return ur.u, ur.tile, ur.scales


def _row_rms(u: torch.Tensor) -> torch.Tensor:
    """RMS of each row of ``u`` (float32 (r, n_pad)) as float64 (r,), summed in float64.

    A float32 sum depends on the order of its additions, which torch picks by the CPU's vector width (AVX2
    and AVX-512 give results an ulp apart), and a float32 row scale would store that ulp: summed in float64
    the RMS is exact to ~1e-13 before it is rounded to the scale dtype, so the stored scales (and so the
    stream) are the same on every CPU. A row of 1e-30 is measured as 1e-30."""
    return u.double().square_().mean(1).sqrt_()


def _row_scales(u: torch.Tensor, scale_dtype: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scales of the rotated rows ``u`` (float32 (R, n_pad)): their RMS rounded to ``scale_dtype``.

    Returns (scales (R,) in the scale dtype, the same as float64); see :func:`_scales_of`."""
    return _scales_of(_row_rms(u), scale_dtype, what)


def _scales_of(rms: torch.Tensor, scale_dtype: str, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row RMS (float64 (R,)) rounded to ``scale_dtype``: (stored scale section, the decoded scales as
    float64 (R,)); :func:`.scales.round_scales` (HQRangeError for a nonzero row the format cannot hold)."""
    return round_scales(rms, scale_dtype, what)


def _fixed_bits(shape, rows: int, lattice: str, n_pad: int, block: int, scale_bytes: int) -> int:
    """Bits of everything except the payload (unary, remainders, escapes): header, scales (``scale_bytes``
    in all, a log8 grid included), ks, offsets."""
    lens = stream_lengths(lattice, rows * n_pad)
    size = header_bytes(len(shape), len(lens)) + scale_bytes
    size += sum(_num_blocks(sn, block) * 5 for sn in lens)  # per block: u8 k, i32 offset
    return 8 * size


def _compiled_pass(t: torch.Tensor):
    """The compiled lattice pass (:mod:`.lattice_jit`, imported on first use) when ``t`` is on the CPU and the
    codec's CPU implementation is the compiled one (:func:`~._np.select`), else None (the torch/numpy path of
    ``nearest`` + ``strip``, the reference: the same integers and symbols bit for bit)."""
    if not select(t, False, False, True):
        return None
    from . import lattice_jit
    return lattice_jit


def _jit_symbols(jit, u: torch.Tensor, lattice: str, alpha: float, outs=None):
    """Symbol streams of ``u`` (float32 (r, n_pad) on the CPU) at ``alpha`` by the compiled pass, into ``outs``
    (int32 numpy arrays, ``stream_lengths`` of ``u``; new ones when None). Returns (outs, largest |y|)."""
    if outs is None:
        outs = [torch.empty(sn, dtype=torch.int32).numpy() for sn in stream_lengths(lattice, u.numel())]
    lo, hi = jit.symbols_into(u.detach().numpy(), lattice, alpha, outs)
    return outs, max(-lo, hi)


def _payload_bits(u: torch.Tensor, lattice: str, alpha: float, block: int) -> int:
    jit = _compiled_pass(u)
    if jit is not None:
        return sum(stream_bits(torch.from_numpy(z), block) for z in _jit_symbols(jit, u, lattice, alpha)[0])
    y = nearest(lattice, u * alpha)
    return sum(stream_bits(z, block) for z in strip(lattice, y))


def _refine_alpha(u: "_UnitRows", lattice: str, rate: float, block: int) -> float:
    """α whose payload rate on the unit rows ``u`` (float32 (r, n_pad), unit RMS) is just under ``rate``.

    Secant iterations in log α on a subsample of rows (the whole tensor when it is small)."""
    rows, n_pad = u.shape
    stride = max(1, math.ceil(rows * n_pad / _SAMPLE_SYMBOLS))
    sample = u.rows(slice(None, None, stride))
    sampled = stride > 1
    target = rate - (0.004 if sampled else 0.0)
    lo, hi = math.log2(ALPHA_RANGE[0]), math.log2(ALPHA_RANGE[1])  # an all-zero tensor has no rate to
    la = math.log2(alpha_for_rate(lattice, max(target, 0.05)))  # follow: α stops at the range's end
    r = _payload_bits(sample, lattice, 2.0**la, block) / sample.numel()
    slope = 1.0
    for _ in range(8):
        err = r - target
        if -0.003 <= err <= 0.0:
            break
        la_new = min(max(la - err / max(slope, 0.05), lo), hi)
        r_new = _payload_bits(sample, lattice, 2.0**la_new, block) / sample.numel()
        if la_new != la:
            slope = max((r_new - r) / (la_new - la), 0.05)
        la, r = la_new, r_new
    return _f32(2.0**la)


def _f32(a: float) -> float:
    """``a`` rounded to float32, as α is stored."""
    return float(torch.tensor(a, dtype=torch.float32))


def _secant(cost, goal: float, la: float, tol: float, iters: int, coords: int, slope: float = 1.0):
    """Secant iterations in ``la = log2 α`` until ``cost(la)`` (bits) lies in ``[goal − tol·coords, goal]``.

    ``slope``: the starting d(cost / coords)/d la (bits per coordinate per doubling of α). Returns
    (la, the last slope, cost(la)); la stays in :data:`ALPHA_RANGE` (an all-zero tensor has no rate to follow:
    α stops at the range's end)."""
    lo, hi = math.log2(ALPHA_RANGE[0]), math.log2(ALPHA_RANGE[1])
    r = cost(la)
    for _ in range(iters):
        err = (r - goal) / coords
        if -tol <= err <= 0.0:
            break
        la_new = min(max(la - err / max(slope, 0.05), lo), hi)
        if la_new == la:
            break
        r_new = cost(la_new)
        slope = max((r_new - r) / coords / (la_new - la), 0.05)
        la, r = la_new, r_new
    return la, slope, r


_MAX_SIZES = 12  # sizes measured by the search for the rate window (:func:`_window_search`)
_BYTE = 8  # the coded size moves in whole bytes: a window narrower than this may hold no size at all


def _stored_bits(syms: list[torch.Tensor], block: int, fixed: int) -> int:
    """The exact ``total_bits`` of a Rice encode of the symbol streams ``syms`` (int32 (n_i,) each), without
    coding them: ``fixed`` (:func:`_fixed_bits`) plus each stream's unary, remainder and escape bits
    (:func:`~.rice.stream_bits`), the unary stream rounded up to a whole byte (remainders and escapes are
    whole bytes already)."""
    return fixed + sum(8 * -(-stream_bits(z, block) // 8) for z in syms)


def _encode_rice_at_rate(ur: "_UnitRows", lattice: str, cfg: CodecConfig, budget: float, fixed: int, build,
                         what: str, observe=None) -> EncodedTensor:
    """Rice encode of the unit rows ``ur`` (R, n_pad) at ``budget`` total bits (``cfg.bps · numel``).

    The total lands in ``(budget − slack, budget]`` (``slack = _RATE_SLACK · numel`` bits) whenever the coded
    size can land there; otherwise the largest size under ``budget`` found within :data:`_MAX_SIZES`
    sizes is coded (one over budget only when none was under it: the caller warns). ``build(alpha[, syms,
    max_abs])`` codes one EncodedTensor (from a pass's symbol streams when given). Sizes are exact
    (:func:`_stored_bits`), so a tensor is coded once unless the search ends away from its last pass.

    - At most :data:`_SAMPLE_SYMBOLS` coordinates: the search starts from the former α
      (:func:`_refine_alpha`), so that an encode which already landed keeps its bytes, and measures sizes on
      the whole (materialized) tensor. When the window is narrower than one byte (``numel < 8 /
      _RATE_SLACK``) the former loop codes it (:func:`_encode_rice_byte_window`): no size may fit there.
    - Larger: a secant on a row subsample's payload (:func:`_payload_bits`; nonzero rows), aiming
      :data:`_AIM` below the budget; then ONE pass over the whole tensor at that α gives its exact size.
      When it lands, its streams are coded as they are; otherwise the sample, shifted by the measured bias,
      stands in for the tensor in a second secant, and the search goes on from there on whole passes.

    The search (:func:`_window_search`) steps in log α, interpolating once a size under and one over the
    budget bracket the target; the Rice size is not monotone in α by tiny steps, so the largest size under
    budget is kept throughout."""
    block = cfg.block
    rows, n_pad = ur.shape
    coords, numel = rows * n_pad, budget / cfg.bps
    slack = _RATE_SLACK * numel
    stride = max(1, math.ceil(coords / _SAMPLE_SYMBOLS))
    if stride == 1:
        alpha = _refine_alpha(ur, lattice, (budget - fixed) / coords, block)
        if slack < _BYTE:
            return _encode_rice_byte_window(alpha, budget, coords, build)
        u = ur.rows(slice(None))
        alpha = _window_search(lambda a: _stored_bits(strip(lattice, nearest(lattice, u * a)), block, fixed),
                               alpha, budget, slack, coords, 1.0)
        del u
        return build(alpha)
    # the sample: every stride-th row among the nonzero ones (a zero row codes to next to nothing, and a
    # strided sample of all rows could alias with zero rows: w[::3] = 0 sampled with stride 3 is all zero)
    live = torch.nonzero(scale_values(ur.scales, cfg.scale_dtype) != 0).flatten()
    if live.numel() == 0:  # an all-zero tensor has no rate to follow: α at the range's end
        return build(_f32(ALPHA_RANGE[1]))
    sample = ur.rows(live[::max(1, math.ceil(live.numel() * n_pad / _SAMPLE_SYMBOLS))])
    scale_s = live.numel() * n_pad / sample.numel()  # what zero rows cost, the bias pass measures
    aim, tol = budget - _AIM * numel, 0.5 * slack / coords

    def sample_cost(la):
        return fixed + scale_s * _payload_bits(sample, lattice, 2.0**la, block)

    last = {}  # the symbol streams of the latest whole pass: coded as they are when the search ends there

    def size(alpha):
        last.clear()
        syms, max_abs = _symbol_streams(ur, lattice, alpha, what, observe)
        last.update(alpha=alpha, syms=syms, max_abs=max_abs)
        return _stored_bits(syms, block, fixed)

    la = math.log2(alpha_for_rate(lattice, max((budget - fixed) / coords, 0.05)))
    la, slope, model = _secant(sample_cost, aim, la, 0.003, 8, coords)
    alpha = _f32(2.0**la)
    bits = size(alpha)  # the one extra whole-tensor pass
    if not -slack < bits - budget <= 0.0:
        bias = bits - model
        la, _, _ = _secant(lambda a: sample_cost(a) + bias, aim, la, tol, 8, coords, slope)
    alpha = _window_search(size, _f32(2.0**la), budget, slack, coords, slope, {alpha: bits})
    if last.get("alpha") == alpha:
        return build(alpha, last.pop("syms"), last["max_abs"])
    last.clear()
    return build(alpha)


def _window_search(size, alpha: float, budget: float, slack: float, coords: int, slope: float,
                   known: dict | None = None) -> float:
    """α (float32) whose ``size(α)`` (exact total bits) lands in ``(budget − slack, budget]``, searched from
    ``alpha`` with at most :data:`_MAX_SIZES` new sizes (``known``: sizes already measured, by α); else the
    α of the largest size under budget, else of the smallest over it. ``slope``: d size/coords per doubling
    of α, for the steps before a bracket exists."""
    sizes = {}
    under = over = None  # (log2 α, size, α): the largest size under budget, the smallest over it

    def note(a, bits):
        nonlocal under, over
        sizes[a] = bits
        if bits <= budget and (under is None or bits > under[1]):
            under = (math.log2(a), bits, a)
        elif bits > budget and (over is None or bits < over[1]):
            over = (math.log2(a), bits, a)

    for a, bits in (known or {}).items():
        note(a, bits)
    for attempt in range(_MAX_SIZES + 1):
        if alpha not in sizes:
            if attempt == _MAX_SIZES:
                break
            note(alpha, size(alpha))
        la, bits = math.log2(alpha), sizes[alpha]
        if -slack < bits - budget <= 0.0:
            return alpha
        goal = budget - (0.5 if bits <= budget else 0.7) * slack
        if under is not None and over is not None and under[0] < over[0]:
            t = (goal - under[1]) / (over[1] - under[1])  # bracketed: interpolate, strictly inside
            la_new = under[0] + min(max(t, 0.1), 0.9) * (over[0] - under[0])
        else:
            la_new = la - (bits - goal) / coords / max(slope, 0.05)
        new = _f32(min(max(2.0**la_new, ALPHA_RANGE[0]), ALPHA_RANGE[1]))
        if new in sizes:  # the end of α's range, or float32 steps exhausted: nothing left to refine
            break
        alpha = new
    return (under if under is not None else over)[2]


def _encode_rice_byte_window(alpha: float, budget: float, coords: int, build) -> EncodedTensor:
    """The former loop, for a tensor whose rate window is narrower than one byte: the first encode at or
    under ``budget`` bits from ``alpha`` down (at most 12; the last one when none is)."""
    for attempt in range(12):
        et = build(alpha)
        if et.total_bits <= budget or attempt == 11:
            return et
        excess = (et.total_bits - budget) / coords
        alpha = _f32(alpha * 2.0 ** -(excess + 0.002))


def _lattice_point(u: torch.Tensor, lattice: str, alpha: float, what: str) -> tuple[torch.Tensor, int]:
    """Nearest lattice integers of ``u · alpha`` (int32, u's shape) and their largest magnitude;
    HQRangeError when α is outside the format's range or the integers exceed :data:`_MAX_ABS_CODE`."""
    _check_alpha(alpha, what)
    y = nearest(lattice, u * alpha)
    lo, hi = torch.aminmax(y)  # as Python ints: |−2**31| stays 2**31 (int32 abs() would wrap it)
    return y, _checked_max_abs(max(-int(lo), int(hi)), what)


def _check_alpha(alpha: float, what: str) -> None:
    if not ALPHA_RANGE[0] <= alpha <= ALPHA_RANGE[1]:
        raise HQRangeError(f"{what}: operating point alpha={alpha:.4g} outside the format's range "
                           f"[{ALPHA_RANGE[0]:.3g}, {ALPHA_RANGE[1]:.3g}]")


def _checked_max_abs(max_abs: int, what: str) -> int:
    if max_abs > _MAX_ABS_CODE:
        raise HQRangeError(f"{what}: lattice integers reach {max_abs} > {_MAX_ABS_CODE}: the requested "
                           f"rate or SNR is too high")
    return max_abs


def _symbol_streams(u, lattice: str, alpha: float, what: str, observe=None) -> tuple[list[torch.Tensor], int]:
    """Stripped symbol streams (1-D int32) of the nearest lattice points of ``u · alpha`` (float32
    (R, n_pad) unit rows: a tensor or a :class:`_UnitRows`) and their largest magnitude, computed over row
    blocks (streams are row-major over the vectors, so the blocks' streams are concatenated). Same checks
    and errors as :func:`_lattice_point`. ``observe(alpha, rows, y)``, when given, sees each block's lattice
    integers (int32 (r, n_pad), rows ``rows``, in row order) before they are stripped (see :func:`encode`)."""
    rows_of = u.rows if isinstance(u, _UnitRows) else u.__getitem__
    blocks = _row_blocks(*u.shape)
    jit = None if observe is not None else _compiled_pass(u.scales if isinstance(u, _UnitRows) else u)
    if jit is not None:  # one compiled pass per block, straight into the streams; observe needs the y
        _check_alpha(alpha, what)
        out = [torch.empty(sn, dtype=torch.int32) for sn in stream_lengths(lattice, math.prod(u.shape))]
        pos, max_abs = [0] * len(out), 0
        for sl in blocks:
            ub = rows_of(sl)
            parts = [o.numpy()[p:p + sn] for o, p, sn in zip(out, pos, stream_lengths(lattice, ub.numel()))]
            max_abs = max(max_abs, _checked_max_abs(_jit_symbols(jit, ub, lattice, alpha, parts)[1], what))
            pos = [p + z.size for p, z in zip(pos, parts)]
        return out, max_abs
    if len(blocks) == 1:
        y, max_abs = _lattice_point(rows_of(slice(None)), lattice, alpha, what)
        if observe is not None:
            observe(alpha, slice(0, u.shape[0]), y)
        return strip(lattice, y), max_abs
    dev = u.scales.device if isinstance(u, _UnitRows) else u.device
    out = [torch.empty(sn, dtype=torch.int32, device=dev) for sn in stream_lengths(lattice, math.prod(u.shape))]
    pos, max_abs = [0] * len(out), 0
    for sl in blocks:
        y, m = _lattice_point(rows_of(sl), lattice, alpha, what)
        max_abs = max(max_abs, m)
        if observe is not None:
            observe(alpha, sl, y)
        for i, z in enumerate(strip(lattice, y)):
            out[i][pos[i]:pos[i] + z.numel()] = z
            pos[i] += z.numel()
        del y
    return out, max_abs


def encode(w: torch.Tensor, cfg: CodecConfig | None = None, key: int | str = 0, observe=None) -> EncodedTensor:
    """Encode a float tensor.

    Args:
        w: float32/float16/bfloat16/float64 tensor of any non-empty shape. Rows are the leading dims
            flattened; the RHT runs along the last dimension (the contraction axis of a weight).
        cfg: codec configuration (default ``CodecConfig()``: E8 at 4.0 total bps).
        key: layer key mixed into the RHT signs (an int or a name); activations must be rotated with
            the same ``(seed, key)``.
        observe: optional ``observe(alpha, rows, y, scales)``, called for every row block of every coding
            attempt with that attempt's α (float), the block's rows (a slice), its lattice integers (int32
            (r, n_pad)) and the decoded row scales of the whole tensor (float32 (R,), :func:`.scales.scale_values`), blocks in row order; the result's ``alpha`` names the attempt that was kept. It lets a
            caller measure the reconstruction while the integers exist, instead of decoding the streams again.

    Returns:
        :class:`EncodedTensor` with ``total_bits / numel ≤ cfg.bps`` whenever the tensor is large enough
        for its fixed overhead (header, one scale per row) to fit; tiny tensors get the lowest-rate
        encoding and a :class:`RateBudgetWarning`.
    """
    cfg = cfg or CodecConfig()
    what = _what(key, getattr(w, "shape", ()))
    _validate(w, what)
    shape = tuple(w.shape)
    lattice = cfg.lattice
    numel = math.prod(shape)
    rans_coder = cfg.resolved_coder(numel) == "rans"
    # Rice: the unit rows are recomputed per row block (one pass for α's sample, one per attempt); rANS
    # makes many passes over them and holds them
    ur = _UnitRows(w, cfg, key, what, hold=rans_coder)
    h, scales = ur.tile, ur.scales
    if observe is not None:
        observe = (lambda obs, sv: lambda a, sl, y: obs(a, sl, y, sv))(observe, scale_values(scales, cfg.scale_dtype))
    rows, n_pad = ur.shape
    key32 = key_to_u32(key)
    fixed = _fixed_bits(shape, rows, lattice, n_pad, cfg.block, scales.numel() * scales.element_size())
    meta = {"tile_used": h}
    if rans_coder:
        return _encode_rans(ur.u, cfg, (shape, w.dtype, h, key32, scales, numel, what, meta), observe)
    def build(alpha, syms=None, max_abs=0):  # one coding attempt; `syms` when a pass already made them
        if syms is None:
            syms, max_abs = _symbol_streams(ur, lattice, alpha, what, observe)
        streams = []
        while syms:  # each symbol stream is freed as soon as it is coded
            streams.append(encode_stream(syms.pop(0), cfg.block))
        return EncodedTensor(shape, w.dtype, lattice, h, cfg.block, cfg.seed, key32, alpha, cfg.scale_dtype,
                             scales, streams, max_abs <= 127, meta={**meta, "max_abs_code": max_abs})

    if cfg.snr_db is not None:
        return build(_f32(alpha_for_snr(lattice, cfg.snr_db)))
    budget = cfg.bps * numel
    rate = (budget - fixed) / (rows * n_pad)
    if rate < _MIN_PAYLOAD_RATE:
        warnings.warn(
            f"{what} is too small for {cfg.bps} bps: its fixed overhead alone is "
            f"{fixed / numel:.2f} bits per scalar; spending {cfg.bps} bits per scalar on the payload",
            RateBudgetWarning, stacklevel=2)
        return build(_refine_alpha(ur, lattice, cfg.bps, cfg.block))
    et = _encode_rice_at_rate(ur, lattice, cfg, budget, fixed, build, what, observe)
    if et.total_bits > budget:
        warnings.warn(f"{what}: could not meet {cfg.bps} bps, got {et.bps:.4f}", RateBudgetWarning, stacklevel=2)
    elif (et.total_bits <= budget - _RATE_SLACK * numel and _RATE_SLACK * numel >= _BYTE
          and et.alpha < ALPHA_RANGE[1]):  # at the range's end there is no more rate to spend (zeros)
        warnings.warn(f"{what}: {et.bps:.4f} bps is more than {_RATE_SLACK} under the requested {cfg.bps} bps "
                      f"(none of {_MAX_SIZES} Rice sizes tried landed closer)", RateBudgetWarning, stacklevel=2)
    return et


def warm_compiled(cfg: CodecConfig | None = None) -> None:
    """Compile (or load from numba's cache) in this process every specialization of the codec's compiled loops
    that encoding with ``cfg`` uses, so that processes forked afterwards share that machine code instead of
    each compiling or loading a copy of their own. Encodes a small float32 (64, 1024) sample, then runs the
    lattice pass on strided rows (numba's layout 'A', a separate specialization: the row subsample of
    :func:`_refine_alpha` on a tensor of more rows than the sample). Nothing is compiled where the CPU
    implementation is numpy (``_np.cpu_impl``)."""
    cfg = cfg or CodecConfig()
    x = torch.linspace(-1.0, 1.0, 64 * 1024).reshape(64, 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encode(x, cfg)
    jit = _compiled_pass(x)
    if jit is not None:
        jit.symbol_counts(x.numpy()[::2], cfg.lattice, 1.0)


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
    return decode_symbols(q, _symbols(q), out)


def _symbols(q: EncodedTensor) -> list[torch.Tensor]:
    """The decoded symbol streams of ``q`` (int32 (n_i,) each), HQFormatError on a wrong stream count."""
    if len(q.streams) != NUM_STREAMS.get(q.lattice, -1):
        raise HQFormatError(f"{q.lattice} needs {NUM_STREAMS.get(q.lattice)} streams, found {len(q.streams)}")
    if q.coder == "rans":
        syms = [_rans_decode(s, rans_contexts(q.lattice, i)) for i, s in enumerate(q.streams)]
    else:
        syms = [decode_stream(s) for s in q.streams]
    return syms


def code_blocks(q: EncodedTensor, block_elems: int):
    """The lattice integers of ``q`` by row blocks, for a pass that needs the whole tensor but not at once:
    yields (row slice, int32 (r, n_pad) lattice integers of those rows), about ``block_elems`` coordinates
    per block. The symbol streams are decoded once (4 bytes per coordinate); each block is unstripped from
    its share of them (the encoder concatenates the row blocks' streams, so the share of ``r`` rows is
    :func:`~.strip.stream_lengths` of ``r · n_pad``), so no full-size int32 tensor of integers is built."""
    syms = _symbols(q)
    rows, n_pad = q.rows, q.n_pad
    step = max(1, block_elems // n_pad)
    pos = [0] * len(syms)
    for s in range(0, rows, step):
        r = min(step, rows - s)
        parts = []
        for i, sn in enumerate(stream_lengths(q.lattice, r * n_pad)):
            parts.append(syms[i][pos[i]:pos[i] + sn])
            pos[i] += sn
        yield slice(s, s + r), unstrip(q.lattice, parts, (r, n_pad))


def decode_symbols(q: EncodedTensor, syms: list[torch.Tensor], out: str = "weight") -> torch.Tensor:
    """The second half of :func:`decode`, from the decoded symbol streams (int32 (n_i,) each, as
    :func:`~.strip.strip` makes them) to ``out`` (``"weight"``, ``"codes"`` or ``"rotated"``, see
    :func:`decode`). Shared by every entropy decoder (numpy, torch, Triton)."""
    rows, n_pad = q.rows, q.n_pad
    y = unstrip(q.lattice, syms, (rows, n_pad))
    if out == "codes":
        lo, hi = torch.aminmax(y)  # one pass, no temporary (abs().max() is ~10× slower on the CPU)
        max_abs = max(-int(lo), int(hi))
        if q.fits_int8:
            if max_abs > 127:
                raise HQFormatError("codes flagged as int8 but out of range")
            return y.to(torch.int8).reshape(q.codes_shape)
        return y.to(torch.int32 if max_abs > 32767 else torch.int16).reshape(q.codes_shape)
    rot = to_physical(q.lattice, y) * (scale_values(q.scales, q.scale_dtype).unsqueeze(1) / q.alpha)
    if out == "rotated":
        return _finite(rot, "rotated weight").reshape(q.codes_shape)
    x = _finite(inverse_rht(rot, q.seed, q.key, q.tile)[:, : q.n], "weight")
    return to_weight_dtype(x.reshape(q.shape), q.dtype)


def _rans_decode(st, num_ctx: int) -> torch.Tensor:
    """Symbols of one rANS stream on the stream's device (the compiled coder on the CPU, the torch twin
    elsewhere; :func:`~._np.select`)."""
    return select(st.words, rans.decode_stream_numpy, rans.decode_stream_torch,
                  rans.decode_stream_compiled)(st, num_ctx)


# ---- rANS: exact rate ------------------------------------------------------------------------------------
_RATE_SLACK = 0.001  # the total rate lands in (bps − slack, bps]
_STATE_INFO_BITS = 7  # payload bits a final lane state carries on average (measured: the model then
#                       matches the coded size of 1024² E8 at 2–5 bps within 0.0002 bit per scalar)
_AIM = 0.0004  # the model aims this far below the budget (bits per scalar); the exact loop corrects


def _rans_streams(u: torch.Tensor, lattice: str, alpha: float, block: int, what: str,
                  observe=None) -> tuple[list, int]:
    """rANS streams of the nearest lattice points of ``u · alpha`` (float32 (R, n_pad)) and their largest
    magnitude: the symbols come from the row-blocked pass of :func:`_symbol_streams` (int32, 4 bytes per
    coordinate), each stream is freed as soon as it is coded (the coder works in bounded space)."""
    syms, max_abs = _symbol_streams(u, lattice, alpha, what, observe)
    streams = []
    for i in range(len(syms)):
        z, syms[i] = syms[i], None
        streams.append(rans.encode_stream(z, block, rans_contexts(lattice, i)))
        del z
    return streams, max_abs


def _rans_model_bits(u: torch.Tensor, lattice: str, alpha: float, block: int) -> float:
    """Estimated stored bits of the streams of ``u`` (float32 (r, n_pad)) at ``alpha`` beyond the fixed part
    (which holds states, offsets and two table entries per context): the table cost of every symbol plus the
    other table entries, minus the payload bits each final state carries. Counted over row blocks (the
    symbol counts of the blocks' pieces of a stream add up), so the work space stays one block."""
    lens = stream_lengths(lattice, u.numel())
    ctx = [rans_contexts(lattice, i) for i in range(len(lens))]
    tops, counts, pos = [0] * len(lens), [0] * len(lens), [0] * len(lens)
    jit = _compiled_pass(u)
    if jit is not None:  # one compiled pass over the whole tensor, no temporaries: the same counts
        tops, counts = jit.symbol_counts(u.detach().numpy(), lattice, alpha)
    for sl in _row_blocks(*u.shape) if jit is None else ():
        for i, z in enumerate(strip(lattice, nearest(lattice, u[sl] * alpha))):
            top, c = rans.count_symbols(z.cpu().numpy(), ctx[i], start=pos[i])
            tops[i], counts[i], pos[i] = max(tops[i], top), counts[i] + c, pos[i] + z.numel()
    bits = 0.0
    for i, sn in enumerate(lens):
        t, c2 = rans.fold_counts(counts[i], tops[i])
        bits += rans.counts_cost_bits(c2) + 8 * 2 * ctx[i] * (t - 2)  # states, offsets, 2 entries: in `fixed`
        bits -= _STATE_INFO_BITS * rans.LANES * rans.num_blocks(sn, block)
    return bits


def _encode_rans(u: torch.Tensor, cfg: CodecConfig, head, observe=None) -> EncodedTensor:
    """rANS encode of unit-RMS rotated rows ``u`` (float32 (R, n_pad)) at exactly ``cfg.bps`` (within
    :data:`_RATE_SLACK` below) or at ``cfg.snr_db``. α: the rate table, a secant on a subsample's model
    cost, a secant on the whole tensor's model cost, then on the exact coded size."""
    shape, dtype, h, key32, scales, numel, what, meta = head
    lattice, block = cfg.lattice, cfg.block
    rows, n_pad = u.shape
    lens = stream_lengths(lattice, rows * n_pad)
    fixed = 8 * (header_bytes(len(shape), len(lens), "rans") + scales.numel() * scales.element_size()
                 + sum(rans.side_bytes(sn, block, rans_contexts(lattice, i), 2) for i, sn in enumerate(lens)))

    def build(alpha):
        streams, max_abs = _rans_streams(u, lattice, alpha, block, what, observe)
        meta["max_abs_code"] = max_abs
        return EncodedTensor(shape, dtype, lattice, h, block, cfg.seed, key32, alpha, cfg.scale_dtype, scales,
                             streams, max_abs <= 127, meta=meta, coder="rans")

    if cfg.snr_db is not None:
        return build(_f32(alpha_for_snr(lattice, cfg.snr_db)))
    budget = cfg.bps * numel
    coords = rows * n_pad
    rate = (budget - fixed) / coords
    if rate < _MIN_PAYLOAD_RATE:
        warnings.warn(f"{what} is too small for {cfg.bps} bps: its fixed overhead alone is {fixed / numel:.2f} "
                      f"bits per scalar; spending {cfg.bps} bits per scalar on the payload",
                      RateBudgetWarning, stacklevel=3)
        return build(_f32(alpha_for_rate(lattice, cfg.bps)))
    stride = max(1, math.ceil(coords / _SAMPLE_SYMBOLS))
    sample = u[::stride]
    aim = budget - _AIM * numel

    def secant(cost, goal, la, tol, iters, slope=1.0):
        return _secant(cost, goal, la, tol, iters, coords, slope)[:2]

    scale_s = coords / sample.numel()
    la = math.log2(alpha_for_rate(lattice, max(rate, 0.05)))
    sample_cost = lambda a: fixed + scale_s * _rans_model_bits(sample, lattice, 2.0**a, block)  # noqa: E731
    la, slope = secant(sample_cost, aim, la, 0.003, 8)
    tol = 0.5 * _RATE_SLACK * numel / coords
    if stride == 1:  # the sample is the tensor
        la, _ = secant(lambda a: fixed + _rans_model_bits(u, lattice, 2.0**a, block), aim, la, tol, 8)
    else:
        # one pass over the whole tensor measures the sample's bias at the sample's α; the sample, corrected
        # by it, then stands for the tensor (its cost moves with α as the tensor's does): one whole pass
        # instead of a secant over whole passes (BENCHMARKS.md §19); the exact loop below checks the result
        bias = fixed + _rans_model_bits(u, lattice, 2.0**la, block) - sample_cost(la)
        la, _ = secant(lambda a: sample_cost(a) + bias, aim, la, tol, 8, slope)
    alpha = _f32(2.0**la)
    et = build(alpha)
    for attempt in range(12):  # exact: the coded size itself
        err = (et.total_bits - budget) / numel
        if -_RATE_SLACK < err <= 0.0:
            return et
        step = 2.0 ** (-(err + (0.3 * _RATE_SLACK if err > 0 else 0.5 * _RATE_SLACK)) * numel / coords)
        alpha = _f32(min(max(alpha * step, ALPHA_RANGE[0]), ALPHA_RANGE[1]))
        if alpha == et.alpha:  # at the end of α's range: nothing left to refine
            break
        prev, et = et, build(alpha)
        if et.total_bits <= budget < prev.total_bits or prev.total_bits <= budget < et.total_bits:
            et = et if et.total_bits <= budget else prev  # bracketing: keep the one under budget, refine
    if et.total_bits > budget:
        warnings.warn(f"{what}: could not meet {cfg.bps} bps, got {et.bps:.4f}", RateBudgetWarning, stacklevel=3)
    return et


def to_weight_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 reconstruction ``x`` cast to the weight's ``dtype``, clamped to its finite range first.

    The encoded weight was finite in ``dtype`` (``|w| ≤ finfo(dtype).max``), so clamping a reconstruction
    that overshoots (quantization error on weights near the maximum, e.g. float16 60000) only moves it
    closer to the original; it never turns into Inf."""
    if dtype in (torch.float16, torch.bfloat16):
        fmax = torch.finfo(dtype).max
        x = x.clamp(-fmax, fmax)
    return x.to(dtype)


def _finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` unchanged when every value is finite; HQFormatError otherwise (a blob whose fields are each in
    range can still combine to overflow float32: its scales, α and codes contradict the encoder)."""
    # a sum is finite when every term is (fast); only when it is not, look at the terms themselves
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        raise HQFormatError(f"decoded {what} is not finite: the scales, alpha and lattice codes of the encoded "
                            f"tensor are inconsistent (corrupt or crafted data)")
    return x
