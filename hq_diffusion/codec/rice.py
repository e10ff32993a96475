"""Rice coding of non-negative int32 symbol streams in a split-stream layout (docs/ARCHITECTURE.md).

A stream of ``n`` symbols is cut into blocks of ``B`` symbols (``B`` a multiple of 8); each block has its
own Rice parameter ``k`` chosen to minimize its coded length. Every Rice code ``z`` is split in two parts
kept in two byte arrays:

- ``unary``: the quotient ``q = z >> k`` as ``q`` zero bits followed by a one bit, all symbols of the
  stream concatenated (bit ``i`` of the stream is bit ``i & 7`` of byte ``i >> 3``). The positions of the
  one bits are the symbol ends, so ``q_i = pos_i − pos_{i−1} − 1`` decodes without a sequential parse.
- ``rem``: the low ``k`` bits of each symbol at fixed width. Each group of 8 consecutive symbols
  occupies exactly ``k`` bytes (the last group is zero-padded), so any group starts at a byte computable
  from the per-block ``k`` alone.

Quotients are bounded: a symbol with ``q ≥ ESC`` is written as exactly ``ESC`` zeros and a one, and its
full quotient goes into the int32 ``escapes`` array (in stream order). A decoder therefore never follows a
run longer than ``ESC`` zeros, and a stream with the wrong number of one bits, a longer run, or a
mismatched escape count is rejected. ``offsets`` holds the unary bit offset at which each block starts —
what a parallel decoder (one program per block) needs to begin anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._np import select, to_numpy, to_torch
from .errors import HQFormatError

# Implementation notes. The work runs in numpy on CPU views of the tensors (see ``_np``), in chunks of
# about ``_CHUNK_SYMBOLS`` symbols so that temporaries stay in cache: per-block sums for choosing k,
# quotients → unary bits (a running cumsum carries the bit position from chunk to chunk), unary bits →
# quotients, and the fixed-width remainders. Fast paths: one k for the whole stream (no per-block
# broadcasts or gathers) and k ∈ {1, 2, 4, 8} (whole symbols per byte); the general paths (SWAR for
# k ≤ 8, a bit matrix above) produce the same bytes. Tensors on other devices (GPU) take the former
# torch implementation at the end of this file, which gives the same streams (``_np.select`` chooses).

ESC = 32  # longest unary run; quotients ≥ ESC are escaped
KMAX = 24  # largest Rice parameter
_CANDIDATES = (-1, 0, 1, 2)


@dataclass
class RiceStream:
    """One Rice-coded symbol stream.

    Attributes (NB = ceil(n / block) blocks, G = ceil(n / 8) groups of 8 symbols):
        n: number of symbols.
        block: symbols per block, a multiple of 8.
        ks: uint8 (NB,) Rice parameter of each block.
        offsets: int32 (NB,) unary-stream bit offset where each block starts.
        unary: uint8 (U,) unary quotient bits, LSB first.
        rem: uint8 (Σ_g k_g,) fixed-width remainders, k bytes per group of 8 symbols.
        escapes: int32 (E,) full quotients of the escaped symbols.
    """

    n: int
    block: int
    ks: torch.Tensor
    offsets: torch.Tensor
    unary: torch.Tensor
    rem: torch.Tensor
    escapes: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ks": self.ks, "offsets": self.offsets, "unary": self.unary, "rem": self.rem,
                "escapes": self.escapes}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _block_lengths(n: int, block: int, device) -> torch.Tensor:
    nb = _num_blocks(n, block)
    lens = torch.full((nb,), block, dtype=torch.int64, device=device)
    lens[-1] = n - (nb - 1) * block
    return lens


def coded_bits(z: torch.Tensor, k: torch.Tensor, lens: torch.Tensor, block: int) -> torch.Tensor:
    """Exact coded size in bits of each block for the given per-block ``k`` (torch reference; the
    encoder computes the same counts in :func:`_choose_k_np`).

    z: int32 (NB·block,) symbols zero-padded to whole blocks; k: int64 (NB,); lens: int64 (NB,) real
    symbols per block. Returns int64 (NB,): unary bits + remainder bytes·8 + 32 per escape.
    """
    zb = z.view(-1, block)
    q = zb >> k.to(torch.int32).unsqueeze(1)
    esc = (q >= ESC).sum(1, dtype=torch.int64)
    unary = q.clamp_max(ESC).sum(1, dtype=torch.int64) + lens  # padded zeros add 0 to Σq
    rem = ((lens + 7) // 8) * 8 * k
    return unary + rem + 32 * esc


# ---- numpy helpers ------------------------------------------------------------------------------

_CHUNK_SYMBOLS = 1 << 18  # symbols per step of the chunked loops (1 MiB of int32): stays in cache


def _block_lengths_np(n: int, block: int) -> np.ndarray:
    """numpy :func:`_block_lengths`: real symbols per block, int64 (NB,)."""
    nb = _num_blocks(n, block)
    lens = np.full(nb, block, dtype=np.int64)
    lens[-1] = n - (nb - 1) * block
    return lens


def _row_reduce(a: np.ndarray, op: str) -> np.ndarray:
    """Per-row ``sum`` (int32 accumulator) or ``max`` of a 2-D integer array (r, w) → (r,).

    numpy is fast for long rows; torch for short ones (numpy loops per row there)."""
    if a.shape[1] >= 64:
        return a.sum(1, dtype=np.int32) if op == "sum" else a.max(1)
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.sum(1, dtype=torch.int32) if op == "sum" else t.amax(1)).numpy()


def _padded(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` (m,) zero-padded to ``size`` ≥ m elements (no copy when m == size)."""
    if a.size == size:
        return a
    out = np.zeros(size, dtype=a.dtype)
    out[:a.size] = a
    return out


def _row_chunks(rows: int, block: int):
    """Slices of whole block rows of a (rows, block) view, about ``_CHUNK_SYMBOLS`` symbols each."""
    step = max(1, _CHUNK_SYMBOLS // block)
    for s in range(0, rows, step):
        yield slice(s, min(rows, s + step))


def _uniform(ks: np.ndarray) -> bool:
    """Whether every block uses the same k (the common case: the fast paths apply)."""
    return bool(ks.min() == ks.max())


# ---- choosing k -------------------------------------------------------------------------------

@dataclass
class _KChoice:
    """Result of :func:`_choose_k_np`; all arrays (NB,) int64.

    ks: chosen Rice parameter; bits: coded bits of the block (unary + remainders + escapes);
    unary: unary bits of the block (Σ min(q, ESC) + symbols); escapes: escaped symbols in the block."""

    ks: np.ndarray
    bits: np.ndarray
    unary: np.ndarray
    escapes: np.ndarray


def _choose_k_np(zp: np.ndarray, n: int, block: int) -> _KChoice:
    """Optimal per-block Rice parameter, the same choice as :func:`choose_k` has always made.

    zp: int32 (NB·block,) symbols zero-padded to whole blocks; n: the real count. For each block the
    candidates ``clamp(base + d, 0, KMAX)``, d = −1, 0, 1, 2, are at most four consecutive k starting
    at ``lo``; Σ min(z >> k, ESC) for all of them comes from one chunk shifted in place by one bit at a
    time, and the first candidate with the fewest bits wins (as the sequential strict ``<`` did).
    Blocks whose largest symbol can reach ESC at ``lo`` are recounted exactly with clamping."""
    nb = zp.size // block
    z2 = zp.reshape(nb, block)
    lens = _block_lengths_np(n, block)
    int32_sum_max = (2**31 - 1) // block  # a block sum fits int32 when every symbol is below this
    zmax = np.empty(nb, dtype=np.int64)
    sums = np.empty(nb, dtype=np.int64)
    for sl in _row_chunks(nb, block):
        zc = z2[sl]
        zmax[sl] = _row_reduce(zc, "max")
        sums[sl] = zc.sum(1, dtype=np.int64) if zmax[sl].max() >= int32_sum_max else _row_reduce(zc, "sum")
    # The float64 formula as always, on the whole (NB,) array in one call: log2 stays torch's (numpy's
    # differs from it in the last bit on some inputs) so that base never moves; / and floor are exact.
    mean = torch.from_numpy(sums / lens)
    base = np.floor(torch.log2(mean.clamp_min(1e-9) * 0.6931 + 1e-12).numpy()).clip(0, KMAX)
    cand = np.clip(base.astype(np.int64)[:, None] + np.array(_CANDIDATES), 0, KMAX)  # (NB, 4)
    lo = cand[:, 0]
    lo32 = lo.astype(np.int32)
    clamp = (zmax >> lo) >= ESC  # rare: escapes possible, recounted below
    qsum = np.empty((nb, 4), dtype=np.int64)  # Σ min(z >> (lo + j), ESC), j = 0..3
    qesc = np.zeros((nb, 4), dtype=np.int64)  # #(z >> (lo + j) ≥ ESC)
    for sl in _row_chunks(nb, block):
        ls = lo32[sl]
        q = z2[sl] >> (ls[0] if ls.min() == ls.max() else ls[:, None])
        for j in range(4):  # unless clamp: q < ESC, so Σq < ESC·block ≤ 2**25 fits int32
            if j:
                q >>= 1
            qsum[sl, j] = _row_reduce(q, "sum")
    crow = np.flatnonzero(clamp)
    for sl in _row_chunks(crow.size, block):
        rows = crow[sl]
        q = z2[rows] >> lo32[rows, None]
        for j in range(4):
            if j:
                q >>= 1
            qesc[rows, j] = _row_reduce((q >= ESC).astype(np.int32), "sum")
            qsum[rows, j] = _row_reduce(np.minimum(q, ESC), "sum")
    j = cand - lo[:, None]
    rows = np.arange(nb)[:, None]
    unary = qsum[rows, j] + lens[:, None]
    esc = qesc[rows, j]
    bits = unary + ((lens[:, None] + 7) // 8) * 8 * cand + 32 * esc
    best = np.argmin(bits, axis=1)[:, None]  # first minimum

    def take(a):
        return np.take_along_axis(a, best, 1)[:, 0]

    return _KChoice(take(cand), take(bits), take(unary), take(esc))


def choose_k(z: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal per-block Rice parameter among candidates around the block mean.

    z: int32 (n,). Returns (ks int64 (NB,), bits int64 (NB,) the coded size of each block), on z's device.
    The candidates are ``clamp(floor(log2(mean·0.6931 + 1e-12)) + d, 0, KMAX)`` for d = −1, 0, 1, 2;
    ties keep the first candidate. :func:`coded_bits` is the reference for the bit counts."""
    return select(z, _choose_k_cpu, _choose_k_torch)(z, n, block)


def _choose_k_cpu(z: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb = _num_blocks(n, block)
    zp = _padded(to_numpy(z.reshape(-1).to(torch.int32))[:n], nb * block)
    ch = _choose_k_np(zp, n, block)
    return to_torch(ch.ks, z.device), to_torch(ch.bits, z.device)


def stream_bits(z: torch.Tensor, block: int) -> int:
    """Total coded bits of ``z`` (int32 (n,)) with optimal per-block k, side information excluded."""
    _, bits = choose_k(z, z.numel(), block)
    return int(bits.sum())


# ---- fixed-width remainders -------------------------------------------------------------------
# A run of symbols with the same k is stored as consecutive k-bit fields, LSB first: 8 symbols fill
# exactly k bytes. Chunk-level packers take m symbols (m a multiple of 8) to m·k/8 bytes and back.

def _pack_k_divides_8(vals: np.ndarray, k: int) -> np.ndarray:
    """Fast packer for k ∈ {1, 2, 4, 8}: each byte holds 8/k whole symbols. int32 (m,) → uint8."""
    r = vals.astype(np.uint8)
    if k == 8:
        return r
    r &= np.uint8((1 << k) - 1)
    if k == 1:
        return np.packbits(r, bitorder="little")
    if k == 2:  # 4 symbols, one per byte of a uint32, gathered into its top byte by one multiply
        return ((r.view(np.uint32) * np.uint32(0x01041040)) >> np.uint32(24)).astype(np.uint8)
    w = r.view(np.uint16)  # k == 4
    return (w | (w >> np.uint16(4))).astype(np.uint8)


def _unpack_k_divides_8(b: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`_pack_k_divides_8`: uint8 (m·k/8,) → uint8 (m,)."""
    if k == 8:
        return b
    if k == 1:
        return np.unpackbits(b, bitorder="little")
    per = 8 // k
    out = np.empty((b.size, per), dtype=np.uint8)
    mask = np.uint8((1 << k) - 1)
    for j in range(per):
        np.bitwise_and(b >> np.uint8(j * k), mask, out=out[:, j])
    return out.reshape(-1)


def _lane_mask(bits: int, lane: int) -> np.uint64:
    """uint64 with the low ``bits`` bits of every ``lane``-bit lane set."""
    return np.uint64(sum(((1 << bits) - 1) << s for s in range(0, 64, lane)))


def _pack_swar(vals: np.ndarray, k: int) -> np.ndarray:
    """General packer for 1 ≤ k ≤ 8. int32 (m,) → uint8 (m·k/8,). The 8 symbols of a group, one per
    byte of a uint64, are merged pairwise, then by quads, then by octets (SWAR)."""
    w = vals.astype(np.uint8)
    w &= np.uint8((1 << k) - 1)
    w = w.view(np.uint64)
    for lane in (16, 32, 64):  # each half lane holds (lane/16)·k bits; join the two halves
        half = lane // 2
        hi = w >> np.uint64(half)
        hi &= _lane_mask(half, lane)
        w &= _lane_mask(half, lane)
        hi <<= np.uint64((lane // 16) * k)
        w |= hi
    return np.ascontiguousarray(w.view(np.uint8).reshape(-1, 8)[:, :k]).reshape(-1)


def _unpack_swar(b: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`_pack_swar`: uint8 (m·k/8,) → uint8 (m,) (the SWAR steps reversed)."""
    w8 = np.zeros((b.size // k, 8), dtype=np.uint8)
    w8[:, :k] = b.reshape(-1, k)
    w = w8.view(np.uint64)
    for lane in (64, 32, 16):  # a lane holds (lane/8)·k bits; split it into two half lanes
        half = (lane // 16) * k
        hi = w >> np.uint64(half)
        hi &= _lane_mask(half, lane)
        w &= _lane_mask(half, lane)
        hi <<= np.uint64(lane // 2)
        w |= hi
    return w8.reshape(-1)


def _pack_wide(vals: np.ndarray, k: int) -> np.ndarray:
    """General packer for any 1 ≤ k ≤ 32 through a bit matrix (used for k > 8). int32 (m,) → uint8."""
    v = np.ascontiguousarray(vals, dtype=np.int32)
    bits = np.unpackbits(v.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :k]
    return np.packbits(bits.reshape(-1), bitorder="little")


def _unpack_wide(b: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`_pack_wide`: uint8 (m·k/8,) → int32 (m,)."""
    bits = np.unpackbits(b, bitorder="little").reshape(-1, k)
    full = np.zeros((len(bits), 32), dtype=np.uint8)
    full[:, :k] = bits
    return np.packbits(full, axis=1, bitorder="little").view(np.int32)[:, 0]


def _packers(k: int, general: bool = False):
    """Chunk-level (pack, unpack) functions for Rice parameter k ≥ 1. ``general`` skips the k | 8 fast
    path (the tests check that both give the same bytes)."""
    if k in (1, 2, 4, 8) and not general:
        return _pack_k_divides_8, _unpack_k_divides_8
    return (_pack_swar, _unpack_swar) if k <= 8 else (_pack_wide, _unpack_wide)


def _pack(vals: np.ndarray, k: int, general: bool = False) -> np.ndarray:
    """Low k bits of m int32 symbols (m a multiple of 8) → uint8 (m·k/8,), LSB first; chunked."""
    out = np.empty(vals.size * k // 8, dtype=np.uint8)
    if k:
        pack = _packers(k, general)[0]
        for s in range(0, vals.size, _CHUNK_SYMBOLS):
            e = min(vals.size, s + _CHUNK_SYMBOLS)
            out[s * k // 8:e * k // 8] = pack(vals[s:e], k)
    return out


def _unpack(b: np.ndarray, k: int, general: bool = False) -> np.ndarray:
    """Inverse of :func:`_pack` (k ≥ 1): uint8 (m·k/8,) → (m,) uint8 for k ≤ 8, else int32; chunked."""
    m = b.size * 8 // k
    out = np.empty(m, dtype=np.uint8 if k <= 8 else np.int32)
    unpack = _packers(k, general)[1]
    for s in range(0, m, _CHUNK_SYMBOLS):
        e = min(m, s + _CHUNK_SYMBOLS)
        out[s:e] = unpack(b[s * k // 8:e * k // 8], k)
    return out


def _block_bytes(ks: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block: remainder bytes when the block is full (int64 (NB,)) and its first byte (int64 (NB,))."""
    size = ks.astype(np.int64) * (block // 8)
    return size, np.cumsum(size) - size


def _rem_bytes(ks: np.ndarray, n: int, block: int) -> int:
    """Total remainder bytes Σ_g k_g over the ceil(n/8) groups of the stream."""
    size, _ = _block_bytes(ks, block)
    short = (len(ks) * block - n) // 8  # whole groups missing from the last block
    return int(size.sum()) - short * int(ks[-1])


def _encode_rem(zp: np.ndarray, ks: np.ndarray, n: int, block: int) -> np.ndarray:
    """Remainder stream: uint8 (Σ_g k_g,). zp: int32 (NB·block,) zero-padded symbols."""
    if _uniform(ks):  # one k: the stream is one run of k-bit fields
        return _pack(zp[:-(-n // 8) * 8], int(ks[0]))
    size, start = _block_bytes(ks, block)
    out = np.empty(int(size.sum()), dtype=np.uint8)  # the last block's padding is cut off below
    z2 = zp.reshape(-1, block)
    for k in np.unique(ks).tolist():
        if k:
            sel = np.flatnonzero(ks == k)
            packed = _pack(z2[sel].reshape(-1), k).reshape(len(sel), -1)
            out[start[sel, None] + np.arange(packed.shape[1])] = packed
    return out[:_rem_bytes(ks, n, block)]


def _add_rem(q: np.ndarray, rem: np.ndarray, ks: np.ndarray, n: int, block: int) -> None:
    """In place ``q ← (q << k) | r`` with r the remainders decoded from ``rem``.
    q: int32 (NB·block,) quotients, zero-padded; rem: uint8 (Σ_g k_g,) of the right size."""
    if _uniform(ks):
        k = int(ks[0])
        if k:
            unpack = _packers(k)[1]
            g8 = -(-n // 8) * 8
            for s in range(0, g8, _CHUNK_SYMBOLS):
                e = min(g8, s + _CHUNK_SYMBOLS)
                qc = q[s:e]
                qc <<= k
                qc |= unpack(rem[s * k // 8:e * k // 8], k)
        return
    size, start = _block_bytes(ks, block)
    rp = _padded(rem, int(size.sum()))
    q2 = q.reshape(-1, block)
    q2 <<= ks.astype(np.int32)[:, None]
    for k in np.unique(ks).tolist():
        if k:
            sel = np.flatnonzero(ks == k)
            b = rp[start[sel, None] + np.arange(block // 8 * k)]
            q2[sel] |= _unpack(b.reshape(-1), k).reshape(len(sel), block)


# ---- unary quotients ---------------------------------------------------------------------------

def _encode_quotients(zp: np.ndarray, ks: np.ndarray, n: int, block: int, total: int,
                      has_escapes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Unary bit stream and escapes of the quotients q = z >> k.

    zp: int32 (NB·block,) zero-padded symbols; total = Σ(min(q, ESC) + 1) < 2**31 unary bits.
    Symbol i is min(q_i, ESC) zeros then a one, so its one bit sits at pos_i = Σ_{j ≤ i}(q_j + 1) − 1.
    Works on chunks of block rows: quotients, a running cumsum for the positions, the bits set in a
    small buffer that starts at the chunk's first byte, packed LSB first.
    Returns (uint8 (ceil(total/8),), int32 (E,) the quotients ≥ ESC in stream order)."""
    out = np.zeros(-(-total // 8), dtype=np.uint8)
    escapes = []
    z2 = zp.reshape(-1, block)
    k32 = ks.astype(np.int32)
    uniform = _uniform(ks)
    base = 0  # first bit of the current chunk
    for sl in _row_chunks(len(ks), block):
        q = z2[sl] >> (k32[0] if uniform else k32[sl, None])
        q = q.reshape(-1)[:n - sl.start * block]  # drop the last block's padding
        if has_escapes:
            esc = q >= ESC
            if esc.any():
                escapes.append(q[esc])
                np.minimum(q, ESC, out=q)
        q += 1
        np.cumsum(q, out=q)  # pos + 1 − base
        b0, off = base >> 3, base & 7
        nbits = off + int(q[-1])
        bits = np.zeros(-(-nbits // 8) * 8, dtype=np.uint8)
        q += off - 1
        bits[q] = 1
        packed = np.packbits(bits, bitorder="little")
        out[b0] |= packed[0]  # the first byte may hold the previous chunk's last bits
        out[b0 + 1:b0 + packed.size] = packed[1:]
        base += nbits - off
    return out, (np.concatenate(escapes) if escapes else np.empty(0, dtype=np.int32))


def _decode_quotients(unary: np.ndarray, q: np.ndarray) -> int:
    """Quotients from a unary bit stream whose number of one bits is already known to be ``q.size``.

    unary: uint8 (U,); q: int32 or int64 (n,) output, q_i = pos_i − pos_{i−1} − 1 with pos_{−1} = −1.
    Works on chunks of bytes (unpack, find the one bits, difference them). Returns pos_{n−1}."""
    last, count = -1, 0
    step = _CHUNK_SYMBOLS // 8
    for b0 in range(0, unary.size, step):
        pos = np.flatnonzero(np.unpackbits(unary[b0:b0 + step], bitorder="little").view(bool))
        if not pos.size:
            continue
        pos += 8 * b0
        qc = q[count:count + pos.size]
        qc[0] = pos[0] - last
        np.subtract(pos[1:], pos[:-1], out=qc[1:], casting="unsafe")
        qc -= 1
        last, count = int(pos[-1]), count + pos.size
    return last


# ---- streams ----------------------------------------------------------------------------------

def encode_stream(z: torch.Tensor, block: int) -> RiceStream:
    """Rice-code a stream. z: int32 (n,) non-negative symbols, n ≥ 1; block: a multiple of 8.
    Returns a :class:`RiceStream` on z's device (tensors not on the CPU take the torch path)."""
    if block % 8 or block <= 0:
        raise ValueError(f"block must be a positive multiple of 8, got {block}")
    n = z.numel()
    if n == 0:
        raise ValueError("cannot encode an empty stream")
    if z.is_floating_point() or z.is_complex():
        raise TypeError(f"Rice symbols must be integers, got {z.dtype}")
    lo, hi = (int(v) for v in torch.aminmax(z.reshape(-1)))  # one pass
    if lo < 0:
        raise ValueError(f"Rice symbols must be non-negative; the smallest is {lo}")
    if hi >= 2**31:
        raise ValueError(f"Rice symbols must fit in int32; the largest is {hi}")
    return select(z, _encode_stream_np, _encode_stream_torch)(z, block)


def _encode_stream_np(z: torch.Tensor, block: int) -> RiceStream:
    n, dev = z.numel(), z.device
    nb = _num_blocks(n, block)
    zp = _padded(to_numpy(z.to(torch.int32).reshape(-1)), nb * block)
    ch = _choose_k_np(zp, n, block)
    total = int(ch.unary.sum())
    if total >= 2**31:
        raise ValueError("stream too long for one encoded tensor (more than 2**31 unary bits)")
    unary, escapes = _encode_quotients(zp, ch.ks, n, block, total, bool(ch.escapes.any()))
    offsets = np.zeros(nb, dtype=np.int32)
    offsets[1:] = np.cumsum(ch.unary[:-1])  # < 2**31 (checked above)
    rem = _encode_rem(zp, ch.ks, n, block)
    return RiceStream(n=n, block=block, ks=to_torch(ch.ks.astype(np.uint8), dev),
                      offsets=to_torch(offsets, dev), unary=to_torch(unary, dev), rem=to_torch(rem, dev),
                      escapes=to_torch(escapes, dev))


def decode_stream(st: RiceStream) -> torch.Tensor:
    """Decode a :class:`RiceStream` to int32 (n,) symbols (on the stream's device). Raises
    :class:`HQFormatError` on any inconsistency (wrong number of symbol ends, overlong runs, escape or
    remainder size mismatch)."""
    return select(st.unary, _decode_stream_np, _decode_stream_torch)(st)


def _decode_stream_np(st: RiceStream) -> torch.Tensor:
    n, block = st.n, st.block
    dev = st.unary.device
    nb = _num_blocks(n, block)
    if st.ks.numel() != nb or st.offsets.numel() != nb:
        raise HQFormatError(f"stream of {n} symbols needs {nb} block headers, found {st.ks.numel()}")
    ks = to_numpy(st.ks).astype(np.int64)
    if nb and int(ks.max()) > KMAX:
        raise HQFormatError(f"Rice parameter {int(ks.max())} exceeds the maximum {KMAX}")
    # unary part: symbol ends are the one bits
    unary = to_numpy(st.unary)
    ones = int(np.bitwise_count(unary).sum(dtype=np.int64))
    if ones != n:
        raise HQFormatError(f"unary stream holds {ones} symbols, expected {n}")
    # runs are shorter than 8·len(unary) bits: int32 unless the stream has 2**28 bytes or more
    q = np.zeros(nb * block, dtype=np.int32 if unary.size < 2**28 else np.int64)
    last = _decode_quotients(unary, q[:n])
    if unary.size != -(-(last + 1) // 8):
        raise HQFormatError("unary stream has trailing bytes after its last symbol")
    qmax = int(q[:n].max())
    if qmax > ESC:
        raise HQFormatError(f"unary run longer than the escape length {ESC}")
    # block b starts at bit pos_{b·block − 1} + 1 = Σ_{i < b·block}(q_i + 1); the padding adds nothing
    lens = _block_lengths_np(n, block)
    expect_off = np.zeros(nb, dtype=np.int64)
    expect_off[1:] = np.cumsum(_row_reduce(q.reshape(nb, block), "sum")[:-1] + lens[:-1])
    if not np.array_equal(expect_off, to_numpy(st.offsets).astype(np.int64)):
        raise HQFormatError("block offsets do not match the unary stream")
    q = q.astype(np.int32, copy=False)
    esc_idx = np.flatnonzero(q[:n] == ESC) if qmax == ESC else np.empty(0, dtype=np.int64)
    if esc_idx.size != st.escapes.numel():
        raise HQFormatError(f"stream has {esc_idx.size} escaped symbols but {st.escapes.numel()} escape values")
    if esc_idx.size:
        ev = to_numpy(st.escapes).astype(np.int32)
        if int(ev.min()) < ESC or bool((ev.astype(np.int64) << ks[esc_idx // block]).max() >= 2**31):
            raise HQFormatError("escape value out of range")
        q[esc_idx] = ev
    # remainder part
    expect_rem = _rem_bytes(ks, n, block)
    if st.rem.numel() != expect_rem:
        raise HQFormatError(f"remainder stream has {st.rem.numel()} bytes, expected {expect_rem}")
    _add_rem(q, to_numpy(st.rem), ks, n, block)
    return to_torch(q[:n], dev)


# ---- torch path -------------------------------------------------------------------------------
# The former pure-torch implementation, kept verbatim for tensors on other devices (a GPU runs it
# natively; a round trip through host memory would cost more there) and as the reference of the tests.

def _choose_k_torch(z: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch version of :func:`choose_k` (the former code), same arguments and results."""
    nb = _num_blocks(n, block)
    zp = torch.nn.functional.pad(z, (0, nb * block - n))
    lens = _block_lengths(n, block, z.device)
    mean = zp.view(nb, block).sum(1, dtype=torch.int64).double() / lens.double()
    # For a geometric source the optimal k is ≈ log2(mean · ln 2); evaluate its neighbours exactly.
    base = torch.floor(torch.log2(mean.clamp_min(1e-9) * 0.6931 + 1e-12)).clamp(0, KMAX).to(torch.int64)
    best_bits = best_k = None
    for d in _CANDIDATES:
        k = (base + d).clamp(0, KMAX)
        bits = coded_bits(zp, k, lens, block)
        if best_bits is None:
            best_bits, best_k = bits, k
        else:
            better = bits < best_bits
            best_bits = torch.where(better, bits, best_bits)
            best_k = torch.where(better, k, best_k)
    return best_k, best_bits


_BYTE_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 0/1 (8m,) → uint8 (m,), LSB first."""
    w = _BYTE_WEIGHTS.to(bits.device)
    return (bits.view(-1, 8) * w).sum(1, dtype=torch.uint8)


def _unpack_bits(b: torch.Tensor) -> torch.Tensor:
    """uint8 (m,) → uint8 0/1 (8m,), LSB first."""
    return ((b.unsqueeze(1) >> _BIT_SHIFTS.to(b.device)) & 1).reshape(-1)


def _pack_groups(vals: torch.Tensor, k: int) -> torch.Tensor:
    """Pack groups of 8 k-bit values. vals: int32 (G, 8) with 0 ≤ v < 2**k → uint8 (G, k)."""
    if k <= 7:
        sh = torch.arange(0, 8 * k, k, dtype=torch.int64, device=vals.device)
        word = (vals.to(torch.int64) << sh).sum(1, keepdim=True)
        bsh = torch.arange(0, 8 * k, 8, dtype=torch.int64, device=vals.device)
        return ((word >> bsh) & 0xFF).to(torch.uint8)
    bits = ((vals.unsqueeze(-1) >> torch.arange(k, dtype=torch.int32, device=vals.device)) & 1)
    return _pack_bits(bits.to(torch.uint8).reshape(-1)).view(-1, k)


def _unpack_groups(b: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_pack_groups`. b: uint8 (G, k) → int32 (G, 8)."""
    if k <= 7:
        bsh = torch.arange(0, 8 * k, 8, dtype=torch.int64, device=b.device)
        word = (b.to(torch.int64) << bsh).sum(1, keepdim=True)
        sh = torch.arange(0, 8 * k, k, dtype=torch.int64, device=b.device)
        return ((word >> sh) & ((1 << k) - 1)).to(torch.int32)
    bits = _unpack_bits(b.reshape(-1)).view(-1, 8, k).to(torch.int32)
    return (bits << torch.arange(k, dtype=torch.int32, device=b.device)).sum(-1, dtype=torch.int32)


def _group_layout(ks: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of 8 symbols: its k (int64 (G,)) and its first remainder byte (int64 (G,))."""
    groups = -(-n // 8)
    kg = ks.to(torch.int64).repeat_interleave(block // 8)[:groups]
    start = torch.cumsum(kg, 0) - kg
    return kg, start


def _encode_stream_torch(z: torch.Tensor, block: int) -> RiceStream:
    """Torch version of :func:`encode_stream` (the former code); z: int32 (n,), block already checked."""
    n = z.numel()
    z = z.to(torch.int32).reshape(-1)
    ks, _ = _choose_k_torch(z, n, block)
    nb = ks.numel()
    k_sym = ks.to(torch.int32).repeat_interleave(block)[:n]
    q = z >> k_sym
    esc_mask = q >= ESC
    escapes = q[esc_mask].to(torch.int32)
    q = q.clamp_max(ESC)
    # unary part
    pos = torch.cumsum(q.to(torch.int64) + 1, 0) - 1
    total = int(pos[-1]) + 1
    if total >= 2**31:
        raise ValueError("stream too long for one encoded tensor (more than 2**31 unary bits)")
    nbytes = -(-total // 8)
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8, device=z.device)
    bits[pos] = 1
    unary = _pack_bits(bits)
    offsets = torch.zeros(nb, dtype=torch.int64, device=z.device)
    if nb > 1:
        offsets[1:] = pos[block - 1:(nb - 1) * block:block] + 1
    # remainder part
    groups = -(-n // 8)
    r = z & ((torch.ones_like(k_sym) << k_sym) - 1)
    r8 = torch.nn.functional.pad(r, (0, groups * 8 - n)).view(groups, 8)
    kg, start = _group_layout(ks, n, block)
    rem = torch.empty(int(kg.sum()), dtype=torch.uint8, device=z.device)
    for k in torch.unique(kg).tolist():
        if k == 0:
            continue
        sel = (kg == k).nonzero().squeeze(1)
        idx = start[sel].unsqueeze(1) + torch.arange(k, device=z.device)
        rem[idx.reshape(-1)] = _pack_groups(r8[sel], k).reshape(-1)
    return RiceStream(n=n, block=block, ks=ks.to(torch.uint8), offsets=offsets.to(torch.int32),
                      unary=unary, rem=rem, escapes=escapes)


def _decode_stream_torch(st: RiceStream) -> torch.Tensor:
    """Torch version of :func:`decode_stream` (the former code), same checks and results."""
    n, block = st.n, st.block
    dev = st.unary.device
    nb = _num_blocks(n, block)
    if st.ks.numel() != nb or st.offsets.numel() != nb:
        raise HQFormatError(f"stream of {n} symbols needs {nb} block headers, found {st.ks.numel()}")
    ks = st.ks.to(torch.int64)
    if nb and int(ks.max()) > KMAX:
        raise HQFormatError(f"Rice parameter {int(ks.max())} exceeds the maximum {KMAX}")
    # unary part: symbol ends are the one bits
    pos = torch.nonzero(_unpack_bits(st.unary)).squeeze(1)
    if pos.numel() != n:
        raise HQFormatError(f"unary stream holds {pos.numel()} symbols, expected {n}")
    if st.unary.numel() != -(-(int(pos[-1]) + 1) // 8):
        raise HQFormatError("unary stream has trailing bytes after its last symbol")
    q = torch.diff(pos, prepend=pos.new_full((1,), -1)) - 1
    if int(q.max()) > ESC:
        raise HQFormatError(f"unary run longer than the escape length {ESC}")
    expect_off = torch.zeros(nb, dtype=torch.int64, device=dev)
    if nb > 1:
        expect_off[1:] = pos[block - 1:(nb - 1) * block:block] + 1
    if not torch.equal(expect_off, st.offsets.to(torch.int64)):
        raise HQFormatError("block offsets do not match the unary stream")
    q = q.to(torch.int32)
    esc_mask = q == ESC
    n_esc = int(esc_mask.sum())
    if n_esc != st.escapes.numel():
        raise HQFormatError(f"stream has {n_esc} escaped symbols but {st.escapes.numel()} escape values")
    k_sym = ks.to(torch.int32).repeat_interleave(block)[:n]
    if n_esc:
        ev = st.escapes.to(torch.int32)
        if int(ev.min()) < ESC or bool((ev.to(torch.int64) << k_sym[esc_mask].to(torch.int64)).max() >= 2**31):
            raise HQFormatError("escape value out of range")
        q[esc_mask] = ev
    # remainder part
    groups = -(-n // 8)
    kg, start = _group_layout(ks, n, block)
    if st.rem.numel() != int(kg.sum()):
        raise HQFormatError(f"remainder stream has {st.rem.numel()} bytes, expected {int(kg.sum())}")
    r8 = torch.zeros(groups, 8, dtype=torch.int32, device=dev)
    for k in torch.unique(kg).tolist():
        if k == 0:
            continue
        sel = (kg == k).nonzero().squeeze(1)
        idx = start[sel].unsqueeze(1) + torch.arange(k, device=dev)
        r8[sel] = _unpack_groups(st.rem[idx], k)
    r = r8.view(-1)[:n]
    return (q << k_sym) | r
