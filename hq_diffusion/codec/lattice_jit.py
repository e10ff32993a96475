"""Compiled (numba) lattice pass of the encoder: nearest lattice point, bit-stripping and symbol counting in one
loop over the vectors, the same integers and symbols as :mod:`.lattice` + :mod:`.strip`, bit for bit
(docs/ARCHITECTURE.md, "What lives where").

The numpy/torch path materializes several full-size float32 and int32 arrays per step (``u · α``, two
rounded candidates, their errors, the lattice integers, the stripped symbols); here every vector is read once
from the unit rows ``u`` (float32 (R, n_pad), any strides), scaled by ``α`` and rounded in registers, and its
symbols are written to the output streams and/or counted per stream and rANS context (what
``rans.count_symbols`` gives the rate model) without any temporary.

Bit-exactness with the torch reference (``lattice._nearest_*_torch``, ``strip._strip_torch``):

- every float step is the same float32 operation in the same order: ``v = u · fl32(α)`` (torch multiplies a
  float32 tensor by ``float32(α)``), ``2·rint(v·½)`` and ``2·rint((v − 1)·½) + 1`` (rint rounds half to even,
  as ``torch.round``), the coordinate sums and the squared distances added left to right in float32 (the order
  of torch's CPU ``sum(-1)`` over a small last axis), A2's ``v₀ / fl32(√3)`` as a true division; numba compiles
  without fast-math, so no operation is contracted (no FMA) or reordered;
- ties: the coordinate moved by the Σ ≡ 2 (mod 4) fix-up is the *first* largest ``|v − y|`` (``torch.argmax``),
  the move is +2 when its error is ≥ 0; E8's odd candidate wins only when strictly closer; A2 likewise;
- integers follow int32 semantics: a rounded value outside the int32 range converts to ``−2**31`` (what the
  x86 conversion of numpy and torch gives), and every int32 operation of the stripping that could overflow
  wraps as it does in int32 (only reachable for integers far beyond ``core._MAX_ABS_CODE``).

The loops are serial and release the GIL (``nogil=True``; no ``parallel=True``, see :mod:`.rans_jit`), compiled
on first use and cached on disk. :mod:`.core` imports this module only when the compiled CPU path runs
(``_np.cpu_impl``), so importing the codec does not import numba; without numba that path raises ImportError
naming the fix — no silent fallback (``hq_diffusion.codec._np.CPU_IMPL = "numpy"`` selects the numpy/torch path).
"""
from __future__ import annotations

import numpy as np

_NO_NUMBA = ("the compiled lattice pass needs numba>=0.68 (a dependency of hq-diffusion: pip install 'numba>=0.68'); "
             "to run the numpy/torch path instead, set hq_diffusion.codec._np.CPU_IMPL = 'numpy'")
try:
    import numba
except ImportError as e:  # pragma: no cover - numba is a dependency; this module is imported on first use
    raise ImportError(_NO_NUMBA) from e

from .lattice import SQRT3, lattice_info
from .strip import stream_lengths

#: Table entries the rate model counts (``rans.MAX_TABLE``: symbols ≥ 255 share the last entry).
MAX_TABLE = 256

_HALF = np.float32(0.5)
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_THREE = np.float32(3.0)
_QUARTER = np.float32(0.25)
_SQRT3_F32 = np.float32(SQRT3)
_I32_MIN = -(2**31)
_I64_MAX = np.int64(2**62)
_ZERO = np.float32(0.0)

# Returned by every pass, int64 (6,): [min y, max y, smallest symbol (0 when not counting), largest symbol of
# stream 0, of stream 1, unused]; counts: int64 (2 streams · 2 contexts · MAX_TABLE,) flat, local to the pass
# (a local histogram and scalar accumulators let the compiler keep them out of the output arrays' way).
_NSTAT = 6


@numba.njit(cache=True, nogil=True, inline="always")
def _to_i32(x):
    """float32 integer value → its int32 value as int64; ``−2**31`` outside the int32 range (x86 conversion)."""
    if not (-2147483648.0 <= x < 2147483648.0):
        return np.int64(_I32_MIN)
    return np.int64(x)


@numba.njit(cache=True, nogil=True, inline="always")
def _w32(x):
    """An int64 value wrapped to int32 as int32 arithmetic would leave it (returned as int64)."""
    return np.int64(np.int32(x))


@numba.njit(cache=True, nogil=True, inline="always")
def _zz(n):
    """zigzag of an int32 value (int64 in, int64 out, int32 semantics): ``(n << 1) ^ (n >> 31)``."""
    return _w32(n << 1) ^ (n >> 31)


@numba.njit(cache=True, nogil=True, inline="always")
def _entry(sym):
    """Table entry counted for a symbol: ``min(sym, MAX_TABLE − 1)`` (a negative symbol, which the caller
    reports, is kept in bounds)."""
    return min(max(sym, 0), MAX_TABLE - 1)


@numba.njit(cache=True, nogil=True)
def _pass_dn(u, alpha, dim, z0, z1, write, count, counts):
    """E8 (``dim`` 8) or D4 (``dim`` 4) over the rows of ``u`` (float32 (R, n_pad), n_pad % dim == 0).

    Per vector: the candidates (E8: the even one and the odd coset; D4: the even one) rounded coordinate by
    coordinate and fixed to Σ ≡ 0 (mod 4) as ``_fix_sum_mod4_torch`` — when the float32 sum (left to right) is
    not a multiple of 4, the first coordinate with the largest ``|v − y|`` moves by ±2 toward ``v`` (+2 when its
    error is ≥ 0), else by 0 (torch's scatter_add of a zero step) — then E8's odd candidate wins when its
    float32 squared distance (left to right) is strictly smaller. Then the stripping of ``strip._strip_torch``:
    E8 writes 8 symbols per vector to ``z0`` (coordinate 8 counted in the second context), D4 3 to ``z0`` and
    1 to ``z1``. ``write``: store the symbols; ``count``: add their table-entry counts to ``counts`` (int64
    (2·2·MAX_TABLE,), stream-major then context). Returns (min y, max y, smallest symbol (0 when not
    counting, else ≤ 0), largest symbol of stream 0, of stream 1). The selects are branch-free: the fix-up and
    the coset are taken by about half the vectors, unpredictably."""
    e8 = dim == 8
    ncand = 2 if e8 else 1
    v = np.empty(8, np.float32)
    yc = np.empty((2, 8), np.float32)
    d = np.empty(2, np.float32)
    hist = np.zeros(counts.size, np.int64)
    lo, hi, smin, top0, top1 = _I64_MAX, -_I64_MAX, np.int64(0), np.int64(0), np.int64(0)
    vec = 0
    for r in range(u.shape[0]):
        for j in range(0, u.shape[1], dim):
            for k in range(dim):
                v[k] = u[r, j + k] * alpha
            for cand in range(ncand):
                off = _ONE if cand else _ZERO  # y = 2·rint((v − off)·½) + off; +0.0 changes no value
                for k in range(dim):
                    yc[cand, k] = np.rint((v[k] - off) * _HALF) * _TWO + off
                s = yc[cand, 0]
                idx = 0
                best = abs(v[0] - yc[cand, 0])
                for k in range(1, dim):
                    s += yc[cand, k]
                    e = abs(v[k] - yc[cand, k])
                    more = e > best
                    best = e if more else best
                    idx = k if more else idx
                q = s * _QUARTER
                step = (_TWO if v[idx] - yc[cand, idx] >= 0 else -_TWO) if np.rint(q) != q else _ZERO
                yc[cand, idx] = yc[cand, idx] + step
                dd = (v[0] - yc[cand, 0]) * (v[0] - yc[cand, 0])
                for k in range(1, dim):
                    e = v[k] - yc[cand, k]
                    dd += e * e
                d[cand] = dd
            w = 1 if e8 and d[1] < d[0] else 0
            c = np.int64(0)
            par = np.int64(0)
            for k in range(dim):
                yk = _to_i32(yc[w, k])
                lo, hi = min(lo, yk), max(hi, yk)
                if e8 and k == 0:
                    c = yk & 1  # E8: s = (y − c) >> 1; D4: c = 0
                s = _w32(yk - c) >> 1
                last = k == dim - 1
                if not last:
                    par += s
                    sym = _zz(s)
                    pos = dim * vec + k if e8 else 3 * vec + k
                else:
                    sym = _zz(_w32(s - (par & 1)) >> 1)
                    sym = _w32(sym << 1) | c if e8 else sym
                    pos = 8 * vec + 7 if e8 else vec
                if write:
                    if e8 or not last:
                        z0[pos] = sym
                    else:
                        z1[pos] = sym
                if count:
                    hist[((MAX_TABLE if e8 else 2 * MAX_TABLE) if last else 0) + _entry(sym)] += 1  # E8: ctx 1
                    smin = min(smin, sym)
                    if last and not e8:
                        top1 = max(top1, sym)
                    else:
                        top0 = max(top0, sym)
            vec += 1
    counts += hist
    return lo, hi, smin, top0, top1


@numba.njit(cache=True, nogil=True)
def _pass_e8(u, alpha, z0, z1, write, count, counts):
    """:func:`_pass_dn` for E8 (the dimension a constant once the call is inlined)."""
    return _pass_dn(u, alpha, 8, z0, z1, write, count, counts)


@numba.njit(cache=True, nogil=True)
def _pass_d4(u, alpha, z0, z1, write, count, counts):
    """:func:`_pass_dn` for D4."""
    return _pass_dn(u, alpha, 4, z0, z1, write, count, counts)


@numba.njit(cache=True, nogil=True)
def _pass_a2(u, alpha, z0, z1, write, count, counts):
    """A2 in (n_y, n_x) form: stream 0 holds ``zz(t_y)``, stream 1 ``zz(n_x)``, one per vector."""
    hist = np.zeros(counts.size, np.int64)
    lo, hi, smin, top0, top1 = _I64_MAX, -_I64_MAX, np.int64(0), np.int64(0), np.int64(0)
    vec = 0
    for r in range(u.shape[0]):
        for j in range(0, u.shape[1], 2):
            a = (u[r, j] * alpha) / _SQRT3_F32
            b = u[r, j + 1] * alpha
            ey = np.rint(a * _HALF) * _TWO
            ex = np.rint(b * _HALF) * _TWO
            oy = np.rint((a - _ONE) * _HALF) * _TWO + _ONE
            ox = np.rint((b - _ONE) * _HALF) * _TWO + _ONE
            de = _THREE * ((a - ey) * (a - ey)) + (b - ex) * (b - ex)
            do = _THREE * ((a - oy) * (a - oy)) + (b - ox) * (b - ox)
            odd = do < de
            ny = _to_i32(oy if odd else ey)
            nx = _to_i32(ox if odd else ex)
            lo, hi = min(lo, ny, nx), max(hi, ny, nx)
            s0 = _zz(_w32(ny - (nx & 1)) >> 1)
            s1 = _zz(nx)
            if write:
                z0[vec] = s0
                z1[vec] = s1
            if count:
                hist[_entry(s0)] += 1
                hist[2 * MAX_TABLE + _entry(s1)] += 1
                smin = min(smin, s0, s1)
                top0, top1 = max(top0, s0), max(top1, s1)
            vec += 1
    counts += hist
    return lo, hi, smin, top0, top1


@numba.njit(cache=True, nogil=True)
def _pass_z(u, alpha, z0, write, count, counts):
    """Z: one stream ``zz(y)``."""
    hist = np.zeros(counts.size, np.int64)
    lo, hi, smin, top = _I64_MAX, -_I64_MAX, np.int64(0), np.int64(0)
    pos = 0
    for r in range(u.shape[0]):
        for j in range(u.shape[1]):
            y = _to_i32(np.rint(u[r, j] * alpha))
            lo, hi = min(lo, y), max(hi, y)
            sym = _zz(y)
            if write:
                z0[pos] = sym
            if count:
                hist[_entry(sym)] += 1
                smin, top = min(smin, sym), max(top, sym)
            pos += 1
    counts += hist
    return lo, hi, smin, top, np.int64(0)


def _run(u: np.ndarray, lattice: str, alpha: float, outs, count: bool):
    """Run the pass of ``lattice``; returns ((min y, max y, smallest symbol, top 0, top 1), counts int64
    (2, 2, MAX_TABLE) per stream and context)."""
    info = lattice_info(lattice)
    if u.dtype != np.float32 or u.ndim != 2 or u.shape[1] % info.dim:
        raise ValueError(f"the lattice pass needs float32 rows (R, n_pad) with n_pad a multiple of {info.dim}, "
                         f"got {u.dtype} of shape {u.shape}")
    lens = stream_lengths(lattice, u.size)
    write = outs is not None
    if write:
        if len(outs) != len(lens) or any(o.dtype != np.int32 or o.shape != (n,) for o, n in zip(outs, lens)):
            raise ValueError(f"{lattice} streams of a ({u.shape[0]}, {u.shape[1]}) block need int32 arrays of "
                             f"lengths {lens}, got {[(o.dtype, o.shape) for o in outs]}")
        zs = list(outs) + [np.empty(0, np.int32)] * (2 - len(outs))
    else:
        zs = [np.empty(0, np.int32)] * 2
    counts = np.zeros(2 * 2 * MAX_TABLE, np.int64)
    a32 = np.float32(alpha)
    if u.size == 0:
        stat = (0, 0, 0, 0, 0)
    elif lattice == "e8":
        stat = _pass_e8(u, a32, zs[0], zs[1], write, count, counts)
    elif lattice == "d4":
        stat = _pass_d4(u, a32, zs[0], zs[1], write, count, counts)
    elif lattice == "a2":
        stat = _pass_a2(u, a32, zs[0], zs[1], write, count, counts)
    else:
        stat = _pass_z(u, a32, zs[0], write, count, counts)
    return tuple(int(x) for x in stat), counts.reshape(2, 2, MAX_TABLE)


def symbols_into(u: np.ndarray, lattice: str, alpha: float, outs: list[np.ndarray]) -> tuple[int, int]:
    """Stripped symbols of the nearest lattice points of ``u · alpha`` written into ``outs``.

    u: float32 (R, n_pad) unit rows (any strides; n_pad a multiple of the lattice dimension); alpha: the
    operating point (used as float32, as torch does); outs: one int32 (n_i,) array per stream, lengths
    ``strip.stream_lengths(lattice, R · n_pad)`` (e.g. views into a whole tensor's streams). The symbols equal
    ``strip(lattice, nearest(lattice, u · alpha))``. Returns (min, max) of the lattice integers (int32 values)."""
    stat, _ = _run(u, lattice, alpha, outs, False)
    return stat[0], stat[1]


def symbol_counts(u: np.ndarray, lattice: str, alpha: float) -> tuple[list[int], list[np.ndarray]]:
    """What ``rans.count_symbols`` gives for every stream of ``strip(lattice, nearest(lattice, u · alpha))``,
    without storing the symbols: (the largest symbol of each stream (0 when it has none), counts int64
    (C, MAX_TABLE) of ``min(symbol, MAX_TABLE − 1)`` per stream, C = ``format.rans_contexts``: E8's stream has
    two contexts, coordinate 8 being the second). u, alpha: as :func:`symbols_into`.

    Raises ValueError when a symbol is negative (int32 overflow of the stripping: lattice integers beyond
    ±2**30, far past what the format stores); the numpy counter rejects such symbols too."""
    stat, counts = _run(u, lattice, alpha, None, True)
    if stat[2] < 0:
        raise ValueError(f"{lattice} lattice integers of {u.shape} rows at alpha={alpha:.6g} overflow the int32 "
                         f"symbol range (they reach [{stat[0]}, {stat[1]}]); no rate can be counted")
    n = len(stream_lengths(lattice, u.size))
    return list(stat[3:3 + n]), [counts[s, :2 if lattice == "e8" else 1].copy() for s in range(n)]
