"""Interleaved rANS coding of non-negative int32 symbol streams with static per-tensor tables
(docs/ARCHITECTURE.md, "The rANS coder").

Layout of one stream of ``n`` symbols (``K = LANES`` = 8 interleaved coders):

- The stream is cut into blocks of ``B = K · block`` symbols. Symbol ``i`` of a block belongs to lane
  ``i mod K`` and step ``i div K``; every lane of a block is an independent rANS coder whose 32-bit state
  starts at ``L = 2**16`` and renormalizes by 16-bit words. The K lanes of a block share one word stream:
  at step ``t`` the lanes read (decoder) their next word in lane order. A block therefore decodes from its
  ``K`` final states and its word offset alone (random access per block; a GPU decodes blocks in
  parallel), and a correct decode ends with every lane back at ``L`` and the block's words used up.
- Symbols come from a table of ``T ≤ 256`` entries per context: ``z < T − 1`` is coded as itself,
  ``z ≥ T − 1`` as the escape entry ``T − 1`` followed (in the int32 ``escapes`` array, stream order) by
  ``z`` itself. Contexts: E8's stream has two (coordinates 1–7 and the coordinate that carries the parity
  bits, lane 7), every other stream one. Frequencies are quantized to ``M = 2**prec`` (12–15 bits).

Side information per stream: ``prec``, ``T``, the ``C × T`` uint16 frequencies, ``K`` uint32 states and
one uint32 word offset per block, the escapes. The cost of a stream is computed exactly by
:func:`stream_bits_exact` (it encodes).

The CPU implementation is numpy, vectorized across all lanes of all blocks: one step of every lane of every
block (the tail block included) is one vector operation per arithmetic step, in place, with numpy scalar
constants (a Python int operand costs about as much as the operation on a few hundred elements). The
encoder runs its states in float64 with the symbols' f, c and M − f gathered per chunk of steps; the decoder
runs int64 states, gathers f and slot − cum per step, and counts the words the 8 lanes of a block read
before each lane with one 64-bit multiply of the lanes' 0/1 bytes. Both take every block's steps in chunks
of about :data:`CHUNK_SYMBOLS` symbols (the tables and escapes are counted in such chunks too), so their work
space is bounded whatever the stream's length, and the bytes do not depend on the chunking. The sequential steps (``block`` per
stream) are fixed by the format, so the per-step cost bounds the speed of small tensors.
:func:`decode_stream_torch` is the torch twin (same result on any device), the reference of the Triton
decoder in ``kernels/rans_decode.py``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from ._np import cpu_impl
from .errors import HQFormatError

LANES = 8  # interleaved rANS coders per block
STATE_LOW = 1 << 16  # L: lower end of the state interval [L, 2**32)
WORD_BITS = 16
PREC_RANGE = (12, 15)
DEFAULT_PREC = 14
MAX_TABLE = 256  # table entries (escape included)


@dataclass
class RansStream:
    """One rANS-coded symbol stream.

    Attributes (NB = ceil(n / (LANES · block)) blocks, C contexts, T table entries):
        n: number of symbols.
        block: steps per lane per block (a block holds ``LANES · block`` symbols).
        prec: log2 of the frequency total M.
        freqs: uint16 (C, T) quantized frequencies, each row sums to M (or is all zero if unused).
        states: uint32 (NB, LANES) final encoder states (the decoder's initial states).
        offsets: uint32 (NB,) index of the first word of each block in ``words``.
        words: uint16 (W,) renormalization words, block after block.
        escapes: int32 (E,) values of the escaped symbols, in stream order.
    """

    n: int
    block: int
    prec: int
    freqs: torch.Tensor
    states: torch.Tensor
    offsets: torch.Tensor
    words: torch.Tensor
    escapes: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"freqs": self.freqs, "states": self.states, "offsets": self.offsets, "words": self.words,
                "escapes": self.escapes}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "RansStream":
        return RansStream(self.n, self.block, self.prec, *(t.to(device) for t in self.tensors().values()))


def contexts(num_ctx: int) -> np.ndarray:
    """Context of each lane: int64 (LANES,). Two contexts: lane 7 alone (E8's parity coordinate)."""
    if num_ctx == 1:
        return np.zeros(LANES, dtype=np.int64)
    if num_ctx == 2:
        return (np.arange(LANES) == LANES - 1).astype(np.int64)
    raise ValueError(f"num_ctx must be 1 or 2, got {num_ctx}")


def num_blocks(n: int, block: int) -> int:
    return -(-n // (LANES * block))


# ---- tables ------------------------------------------------------------------------------------------
def quantize_freqs(counts: np.ndarray, prec: int) -> np.ndarray:
    """Counts int64 (T,) → frequencies int64 (T,) summing to ``2**prec``: every nonzero count gets at least
    1, the rest by largest remainder on ``count · M / total``. All-zero counts stay zero."""
    total = int(counts.sum())
    m = 1 << prec
    if total == 0:
        return np.zeros_like(counts)
    nz = counts > 0
    if int(nz.sum()) > m:
        raise ValueError(f"{int(nz.sum())} distinct symbols do not fit a table of total {m}")
    exact = counts * (m / total)
    f = np.where(nz, np.maximum(1, np.floor(exact)), 0).astype(np.int64)
    d = m - int(f.sum())
    if d > 0:  # give the missing units to the largest remainders
        order = np.argsort(-(exact - f), kind="stable")
        f[order[:d]] += 1
    while d < 0:  # over (many forced 1s): take from the entries that lose the least per unit
        cand = np.flatnonzero(f > 1)
        loss = counts[cand] * np.log2(f[cand] / (f[cand] - 1.0))
        take = cand[np.argsort(loss, kind="stable")[: -d]]
        f[take] -= 1
        d = m - int(f.sum())
    top = int(np.argmax(f))
    if f[top] > max_freq(prec):  # cap the most frequent entry (bounds symbols per stored bit, see format)
        spill = int(f[top]) - max_freq(prec)
        f[top] -= spill
        others = np.flatnonzero(np.arange(f.size) != top)
        f[others[np.argsort(-counts[others], kind="stable")[0]]] += spill
    return f


def max_freq(prec: int) -> int:
    """Largest frequency an entry may have: 15/16 of M. Every coded symbol then costs at least
    log2(16/15) ≈ 0.093 bits, so a stream of n symbols stores at least n/172 words (checked on load)."""
    return (15 << prec) >> 4


#: Symbols per chunk of the encoder's passes (tables, escapes, the state steps): its work arrays hold about
#: 40 bytes per symbol of one chunk, so an encode needs O(chunk) work space beyond its input and output.
CHUNK_SYMBOLS = 1 << 21


def _chunks(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


def count_symbols(z: np.ndarray, num_ctx: int, start: int = 0) -> tuple[int, np.ndarray]:
    """Largest symbol and the counts int64 (C, MAX_TABLE) of ``min(z, MAX_TABLE − 1)`` per context, for the
    symbols ``z`` (int32 (n,)) that sit at positions ``start …`` of their stream (position ``i`` is in lane
    ``i mod LANES``; for two contexts lane 7 has its own). Chunked: no full-size temporary. Counts of
    consecutive pieces of a stream add up (:func:`fold_counts` turns them into a table's counts)."""
    contexts(num_ctx)  # validates num_ctx
    total = np.zeros(MAX_TABLE, np.int64)
    last = np.zeros(MAX_TABLE, np.int64)
    top = 0
    for a, b in _chunks(z.size, CHUNK_SYMBOLS):
        sym = np.minimum(z[a:b], MAX_TABLE - 1)
        top = max(top, int(z[a:b].max()))
        total += np.bincount(sym, minlength=MAX_TABLE)
        if num_ctx == 2:
            last += np.bincount(sym[(LANES - 1 - start - a) % LANES:: LANES], minlength=MAX_TABLE)
    return top, (total[None] if num_ctx == 1 else np.stack([total - last, last]))


def fold_counts(counts: np.ndarray, top: int) -> tuple[int, np.ndarray]:
    """Counts int64 (C, MAX_TABLE) of a stream whose largest symbol is ``top`` → its table size T and the
    counts int64 (C, T) of its table entries (entry ``T − 1``, the escape, counts every symbol ≥ T − 1)."""
    t = min(top, MAX_TABLE - 2) + 2
    out = counts[:, :t].copy()
    out[:, t - 1] = counts[:, t - 1:].sum(1)
    return t, out


def _counts(z: np.ndarray, num_ctx: int) -> tuple[int, np.ndarray]:
    """Table size T and counts int64 (C, T) of the table entries of ``z`` (int32 (n,))."""
    top, counts = count_symbols(z, num_ctx)
    return fold_counts(counts, top if z.size else 0)


def build_tables(z: np.ndarray, num_ctx: int, prec: int, block: int) -> tuple[int, np.ndarray]:
    """Table size T and frequencies int64 (C, T) for the symbols ``z`` (int32 (n,))."""
    t, counts = _counts(z, num_ctx)
    return t, np.stack([quantize_freqs(c, prec) for c in counts])


def table_cost_bits(z: np.ndarray, num_ctx: int, prec: int = DEFAULT_PREC) -> float:
    """Estimated payload bits of ``z`` (int32 (n,)) under its own quantized tables: Σ log2(M / f) plus
    32 bits per escape. Excludes states, offsets and the tables (see :func:`side_bits`)."""
    return counts_cost_bits(_counts(z, num_ctx)[1], prec)


def counts_cost_bits(counts2: np.ndarray, prec: int = DEFAULT_PREC) -> float:
    """:func:`table_cost_bits` from a stream's table-entry counts int64 (C, T) (see :func:`fold_counts`)."""
    freqs = np.stack([quantize_freqs(c, prec) for c in counts2])
    counts = counts2.reshape(-1)
    f = freqs.reshape(-1).astype(np.float64)
    used = counts > 0
    return float((counts[used] * (prec - np.log2(f[used]))).sum()) + 32.0 * int(counts2[:, -1].sum())


def side_bytes(n: int, block: int, num_ctx: int, t: int) -> int:
    """Bytes of one stream's tables, states and offsets (not words or escapes)."""
    nb = num_blocks(n, block)
    return 2 * num_ctx * t + 4 * LANES * nb + 4 * nb


# ---- numpy encoder / decoder --------------------------------------------------------------------------
def _layout(n: int, block: int):
    """(full blocks, steps per full block, tail symbols)."""
    b = LANES * block
    return n // b, block, n - (n // b) * b


def encode_stream(z: torch.Tensor, block: int, num_ctx: int = 1, prec: int = DEFAULT_PREC) -> RansStream:
    """rANS-encode symbols ``z`` (int32 (n,), non-negative) on the CPU in numpy. ``block``: steps per lane
    per block (a block codes ``LANES · block`` symbols).

    Work space: O(:data:`CHUNK_SYMBOLS`) beyond ``z`` and the output (the tables and escapes are gathered
    chunk by chunk, the states step through :func:`_encode_steps` a few steps of every block at a time)."""
    if z.dtype != torch.int32 or z.dim() != 1:
        raise ValueError(f"expected a 1-D int32 tensor, got {z.dtype} of shape {tuple(z.shape)}")
    if not PREC_RANGE[0] <= prec <= PREC_RANGE[1]:
        raise ValueError(f"prec must be in {PREC_RANGE}, got {prec}")
    zn = z.detach().cpu().numpy()
    if zn.size and int(zn.min()) < 0:
        raise ValueError("rANS symbols must be non-negative")
    n = zn.size
    t, freqs = build_tables(zn, num_ctx, prec, block)
    escapes = np.concatenate([zn[i:j][zn[i:j] >= t - 1] for i, j in _chunks(n, CHUNK_SYMBOLS)] or
                             [np.zeros(0, np.int32)]).astype(np.int32)
    if n == 0:
        return RansStream(0, block, prec, torch.from_numpy(freqs.astype(np.uint16)),
                          torch.zeros(0, LANES, dtype=torch.uint32), torch.zeros(0, dtype=torch.uint32),
                          torch.zeros(0, dtype=torch.uint16), torch.from_numpy(escapes))
    states, offsets, words = cpu_impl(_encode_blocks, _encode_blocks_compiled)(zn, t, num_ctx, block, freqs, prec)
    return RansStream(n, block, prec, torch.from_numpy(freqs.astype(np.uint16)),
                      torch.from_numpy(states), torch.from_numpy(offsets.astype(np.uint32)),
                      torch.from_numpy(words), torch.from_numpy(escapes))


def _block_major(zn: np.ndarray, t: int, num_ctx: int, block: int, s0: int, s1: int) -> np.ndarray:
    """Flat table index of the symbols of steps ``s0 … s1 − 1`` of every block: intp (NB, s1 − s0, K). The
    tail block (if any) is the last block; its absent symbols (after its last one) get the identity entry
    ``C · T`` (f = M, c = 0), which leaves a state unchanged and never emits a word. A block has S = ``block``
    steps if there is a full block, else the tail's steps (:func:`_steps`)."""
    n = zn.size
    nfull, steps, tail = _layout(n, block)
    nb = nfull + (1 if tail else 0)
    g = np.full((nb, s1 - s0, LANES), num_ctx * t, np.intp)
    if nfull:
        np.minimum(zn[: nfull * LANES * steps].reshape(nfull, steps, LANES)[:, s0:s1], t - 1, out=g[:nfull],
                   casting="unsafe")
    if tail:
        base = nfull * LANES * steps
        a, b = base + s0 * LANES, base + min(tail, s1 * LANES)
        if b > a:
            np.minimum(zn[a:b], t - 1, out=g[nfull].reshape(-1)[: b - a], casting="unsafe")
    if num_ctx == 2:  # lane 7 reads the second table
        g[:, :, LANES - 1] += np.where(g[:, :, LANES - 1] < num_ctx * t, t, 0)
    return g


def _steps(n: int, block: int) -> int:
    nfull, steps, tail = _layout(n, block)
    return steps if nfull else -(-tail // LANES)


def _encode_blocks(zn: np.ndarray, t: int, num_ctx: int, block: int, freqs: np.ndarray, prec: int):
    """Encode the symbols ``zn`` (int32 (n,)) with tables ``freqs`` (int64 (C, T)) → final states
    uint32 (NB, K), block offsets int64 (NB,), words uint16 (W,) in decoder order (block, step, lane).

    The encoder runs the steps backwards; it takes them in chunks of every block's steps ``s0 … s1 − 1``
    (about :data:`CHUNK_SYMBOLS` symbols a chunk, see :func:`_encode_steps`) carrying the states, and
    places each chunk's words behind those of the lower steps of the same block once every chunk's word
    counts are known. The result does not depend on the chunking (blocks and steps are coded the same)."""
    nfull, _, tail = _layout(zn.size, block)
    nb, steps = nfull + (1 if tail else 0), _steps(zn.size, block)
    m = 1 << prec
    fq = np.append(freqs.reshape(-1), m).astype(np.float64)  # + the identity entry
    cm = np.append((np.cumsum(freqs, axis=1) - freqs).reshape(-1), 0).astype(np.float64)
    x = np.full((nb, LANES), float(STATE_LOW))
    per = max(1, CHUNK_SYMBOLS // (nb * LANES))
    parts = []  # (words uint16 in (block, step, lane) order, word counts int64 (NB,)), highest steps first
    for s1 in range(steps, 0, -per):
        s0 = max(0, s1 - per)
        parts.append(_encode_steps(x, _block_major(zn, t, num_ctx, block, s0, s1), fq, cm, m, prec))
    counts = sum(c for _, c in parts)
    offsets = np.zeros(nb, np.int64)
    offsets[1:] = np.cumsum(counts)[:-1]
    words = np.empty(int(counts.sum()), np.uint16)
    base = offsets.copy()
    while parts:  # lowest steps first: each chunk's words go after the lower steps' words of their block
        w, c = parts.pop()
        start = np.cumsum(c) - c  # each block's first word within the chunk
        words[np.repeat(base - start, c) + np.arange(w.size)] = w
        base += c
    return x.astype(np.uint32), offsets, words


def _encode_blocks_compiled(zn: np.ndarray, t: int, num_ctx: int, block: int, freqs: np.ndarray, prec: int):
    """:func:`_encode_blocks` by the compiled loops of :mod:`.rans_jit` (the same bytes)."""
    from . import rans_jit  # on first use: imports numba

    return rans_jit.encode_blocks(zn, t, num_ctx, block, freqs, prec, STATE_LOW)


def _encode_steps(x: np.ndarray, g: np.ndarray, fq: np.ndarray, cm: np.ndarray, m: int, prec: int):
    """Run the encoder states ``x`` (float64 (NB, K), updated in place) backwards through the steps of the
    table indices ``g`` (intp (NB, S, K), see :func:`_block_major`; ``fq``/``cm``: float64 frequency and
    cumulative frequency per flat index). Returns the words emitted, uint16 in (block, step, lane) order, and
    their count per block int64 (NB,).

    The states run in float64: every value is an integer below 2**33, so products, sums and the
    power-of-two scalings are exact, and ``floor(x / f)`` is exact too (a non-integer quotient of
    x < 2**33 by f ≤ 2**15 is at least 2**-15 from an integer, far above float64's rounding). One step of
    every lane of every block is one vector operation; a word is emitted when ``x ≥ f · 2**(32 − prec)``."""
    nb, steps, k = g.shape
    f_all = fq[g]
    c_all = cm[g]
    del g
    mf_all = m - f_all
    tmp = np.empty_like(x)
    emit = np.empty((nb, steps, k), bool)
    wx = np.empty((nb, steps, k), np.uint32)
    hi, lo = np.float64(2.0 ** -(32 - prec)), np.float64(2.0 ** -WORD_BITS)
    for s in range(steps - 1, -1, -1):
        f, e = f_all[:, s], emit[:, s]  # strided views: one step of every block
        np.multiply(x, hi, out=tmp)
        np.greater_equal(tmp, f, out=e)
        np.copyto(wx[:, s], x, casting="unsafe")  # exact: 0 ≤ x < 2**32
        np.multiply(x, lo, out=tmp)
        np.floor(tmp, out=tmp)
        np.copyto(x, tmp, where=e)
        np.divide(x, f, out=tmp)
        np.floor(tmp, out=tmp)
        np.multiply(tmp, mf_all[:, s], out=tmp)
        tmp += c_all[:, s]
        x += tmp
    return (wx[emit] & 0xFFFF).astype(np.uint16), emit.sum((1, 2))


def decode_stream(st: RansStream, num_ctx: int = 1) -> torch.Tensor:
    """Decode a :class:`RansStream` to int32 (n,) symbols on the CPU: the compiled decoder
    (:func:`decode_stream_compiled`) or, with ``codec._np.CPU_IMPL = "numpy"``, the numpy reference
    (:func:`decode_stream_numpy`); the same symbols and the same HQFormatError on inconsistent data (tables that
    do not sum to M, a block that does not end at ``L`` with its words used up, escapes)."""
    return cpu_impl(decode_stream_numpy, decode_stream_compiled)(st, num_ctx)


def _checked_layout(st: RansStream, num_ctx: int):
    """The validated parts of a stream: (frequencies int64 (C, T), T, M, states (NB, K), offsets int64 (NB,),
    ends int64 (NB,) (each block's word range is ``offsets[b] … ends[b]``), words (W,) as stored).
    HQFormatError for malformed tables, state/offset shapes, or offsets that do not increase from 0."""
    freqs, t, m = check_tables(st, num_ctx)
    states = st.states.cpu().numpy()
    offsets = st.offsets.cpu().numpy().astype(np.int64)
    words = st.words.cpu().numpy()
    nb = num_blocks(st.n, st.block)
    if states.shape != (nb, LANES) or offsets.shape != (nb,):
        raise HQFormatError(f"rANS stream of {st.n} symbols needs {nb} blocks of states and offsets")
    ends = np.append(offsets[1:], len(words))
    if nb and (offsets[0] != 0 or np.any(ends < offsets)):
        raise HQFormatError("rANS block offsets are not increasing from 0")
    return freqs, t, m, states, offsets, ends, words


def decode_stream_compiled(st: RansStream, num_ctx: int = 1) -> torch.Tensor:
    """:func:`decode_stream_numpy` by the compiled loop of :mod:`.rans_jit` (serial, one block after the
    other): int32 (n,) symbols, escapes substituted; HQFormatError on the same inconsistent data."""
    from . import rans_jit  # on first use: imports numba

    freqs, t, m, states, offsets, ends, words = _checked_layout(st, num_ctx)
    if st.n == 0:
        return torch.zeros(0, dtype=torch.int32)
    lut, fq, dq = _decode_tables(freqs, m)
    out, status = rans_jit.decode_symbols(st.n, st.block, _unsigned(states, np.uint32), offsets, ends,
                                          _unsigned(words, np.uint16), lut, fq, dq, num_ctx, st.prec, STATE_LOW, t,
                                          st.escapes.cpu().numpy().astype(np.int32, copy=False))
    if status:
        raise HQFormatError(f"rANS stream is corrupt: {rans_jit.MESSAGES[status]}")
    return torch.from_numpy(out)


def _unsigned(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` as the unsigned ``dtype``: a view of an integer array of the same width (uint32 bits kept in int32,
    as ``HQLinear`` stores them), else a cast."""
    if a.dtype.kind in "iu" and a.dtype.itemsize == np.dtype(dtype).itemsize:
        return a.view(dtype)
    return a.astype(dtype)


def decode_stream_numpy(st: RansStream, num_ctx: int = 1) -> torch.Tensor:
    """The numpy reference decoder (vectorized across the lanes of every block, one vector call per step and
    operation): int32 (n,) symbols. HQFormatError on inconsistent data."""
    freqs, t, m, states, offsets, ends, words = _checked_layout(st, num_ctx)
    states, words = states.astype(np.int64), words.astype(np.int64)
    nfull, steps, tail = _layout(st.n, st.block)
    nb = nfull + (1 if tail else 0)
    if st.n == 0:
        return torch.zeros(0, dtype=torch.int32)
    lut, fq, dq = _decode_tables(freqs, m)
    if not words.size:
        words = np.zeros(1, np.int64)  # every read is then rejected by the end check
    ctx_bits = contexts(num_ctx) * m if num_ctx > 1 else None
    ts = -(-tail // LANES)  # steps of the tail block
    s = steps if nfull else ts
    # table entries (T ≤ 256) as uint8, block-major (the symbols' order, no transpose at the end); the slots
    # (int64) of at most CHUNK_SYMBOLS symbols at a time: the work space does not grow with the stream
    sym = np.zeros((nb, s, LANES), np.uint8)
    lut8 = lut.astype(np.uint8)
    per = max(1, CHUNK_SYMBOLS // (nb * LANES))
    buf = np.zeros((nb, min(per, s), LANES), np.int64)

    def run(x, p, a, b):
        for c0 in range(a, b, per):
            c1 = min(b, c0 + per)
            out = buf[: len(x), : c1 - c0]
            x, p = _decode_steps(x, p, out, words, fq, dq, ctx_bits, st.prec)
            sym[: len(x), c0:c1] = lut8.take(out)
        return x, p

    x, ptr, ok = states, offsets - 1, True
    if tail:  # every block to the tail's last step, which only the tail's first `last` lanes take
        x, ptr = run(x, ptr, 0, ts - 1)
        last = tail - (ts - 1) * LANES
        slots = np.zeros(last, np.int64)
        xt, pt = _decode_lanes(x[nfull, :last], int(ptr[nfull]), slots, words, fq, dq,
                               None if ctx_bits is None else ctx_bits[:last], st.prec)
        sym[nfull, ts - 1, :last] = lut8.take(slots)
        ok = bool(np.all(xt == STATE_LOW) and np.all(x[nfull, last:] == STATE_LOW) and pt + 1 == ends[nfull])
        x, ptr = x[:nfull], ptr[:nfull]
    if nfull:
        x, ptr = run(x, ptr, ts - 1 if tail else 0, s)
    if not ok or np.any(x != STATE_LOW) or np.any(ptr + 1 != ends[:nfull]):
        raise HQFormatError("rANS stream is corrupt: a block does not end in its initial state with its words "
                            "used up")
    flat = sym[:nfull].reshape(-1)
    if tail:  # the tail block's symbols: its first ts steps
        flat = np.concatenate([flat, sym[nfull, :ts].reshape(-1)[:tail]])
    return torch.from_numpy(_apply_escapes(flat, t, st.escapes.cpu().numpy()))


_PREFIX = np.uint64(0x0101010101010101)  # × 8 packed 0/1 bytes = their inclusive prefix sums (little-endian)


def _decode_steps(x, ptr, out, words, fq, dq, ctx_bits, prec):
    """Decode steps of every lane of ``nb`` blocks: states ``x`` int64 (nb, K), ``ptr`` int64 (nb,) index of
    each block's last word read; writes the flat table slots (``slot | context · M``) of each step into
    ``out`` int64 (nb, S, K) (a strided view is fine) and returns the new (x, ptr). One vector operation per step for each of: slot,
    state update (one gather of f and one of slot − cum), renormalization test, the lanes' word indices
    (the prefix count of the 8 lanes' 0/1 needs as one 64-bit multiply), the word gather and the masked
    shift-in. Reads past ``words`` are clipped (the end check rejects such a stream)."""
    nb = x.shape[0]
    x = np.array(x, np.int64)
    p = np.array(ptr, np.int64).reshape(nb, 1)
    mask, shift, low, wbits = np.int64((1 << prec) - 1), np.int64(prec), np.int64(STATE_LOW), np.int64(WORD_BITS)
    need = np.empty((nb, LANES), bool)
    tmp, w = np.empty((nb, LANES), np.int64), np.empty((nb, LANES), np.int64)
    widx = (np.empty((nb, LANES), np.int64), np.empty((nb, LANES), np.int64))
    packed = need.view(np.uint64).reshape(nb)
    cs64 = np.empty(nb, np.uint64)
    cs8 = cs64.view(np.uint8).reshape(nb, LANES)
    little = sys.byteorder == "little"
    for i in range(out.shape[1]):
        sl = out[:, i]
        np.bitwise_and(x, mask, out=sl)
        if ctx_bits is not None:
            np.bitwise_or(sl, ctx_bits, out=sl)
        np.right_shift(x, shift, out=x)
        fq.take(sl, out=tmp, mode="clip")
        np.multiply(x, tmp, out=x)
        dq.take(sl, out=tmp, mode="clip")
        np.add(x, tmp, out=x)
        np.less(x, low, out=need)
        wi = widx[i & 1]
        if little:
            np.multiply(packed, _PREFIX, out=cs64)
            np.copyto(wi, cs8)
        else:
            np.cumsum(need, axis=1, out=wi)
        np.add(wi, p, out=wi)
        words.take(wi, out=w, mode="clip")
        np.left_shift(x, wbits, out=tmp)
        np.bitwise_or(tmp, w, out=tmp)
        np.copyto(x, tmp, where=need)
        p = wi[:, LANES - 1:]
    return x, p.reshape(nb).copy()


def _decode_lanes(x, ptr, out, words, fq, dq, ctx_bits, prec):
    """One decode step of the first ``w`` lanes of one block (the tail block's last step): states int64 (w,),
    ``ptr`` the block's last word read; writes the slots into ``out`` int64 (w,); returns (x, ptr)."""
    out[:] = x & ((1 << prec) - 1)
    if ctx_bits is not None:
        out |= ctx_bits
    x = fq[out] * (x >> prec) + dq[out]
    need = x < STATE_LOW
    cs = np.cumsum(need)
    w = words[np.clip(ptr + cs, 0, len(words) - 1)]
    x = np.where(need, (x << WORD_BITS) | w, x)
    return x, ptr + int(cs[-1])


def check_tables(st: RansStream, num_ctx: int) -> tuple[np.ndarray, int, int]:
    """Validate a stream's tables: (frequencies int64 (C, T), T, M). HQFormatError when malformed."""
    if not PREC_RANGE[0] <= st.prec <= PREC_RANGE[1]:
        raise HQFormatError(f"rANS precision {st.prec} outside {PREC_RANGE}")
    freqs = st.freqs.cpu().numpy().astype(np.int64)
    if freqs.ndim != 2 or freqs.shape[0] != num_ctx or not 2 <= freqs.shape[1] <= MAX_TABLE:
        raise HQFormatError(f"rANS table of shape {tuple(freqs.shape)}, expected ({num_ctx}, 2..{MAX_TABLE})")
    m = 1 << st.prec
    sums = freqs.sum(1)
    if np.any((sums != m) & (sums != 0)):
        raise HQFormatError(f"rANS frequencies sum to {sums.tolist()}, expected {m} (or 0 for an unused context)")
    if int(freqs.max()) > max_freq(st.prec):
        raise HQFormatError(f"rANS frequency {int(freqs.max())} exceeds the maximum {max_freq(st.prec)}")
    return freqs, freqs.shape[1], m


def _decode_tables(freqs: np.ndarray, m: int):
    """Per slot of every context: the flat symbol index (for the output), f and slot − cum (int64 (C·M,))."""
    c, t = freqs.shape
    flat = freqs.reshape(-1)
    sym_of_slot = np.repeat(np.arange(c * t), flat)  # C·M entries for used contexts
    full = np.zeros(c * m, np.int64)
    cum = np.zeros(c * m, np.int64)
    starts = (np.cumsum(freqs, axis=1) - freqs).reshape(-1)  # cum within each context
    # contexts with an all-zero row are never decoded (their lanes get no symbols); fill them with entry 0
    filled = np.zeros(c * m, bool)
    row_used = freqs.sum(1) > 0
    pos = np.concatenate([np.arange(ci * m, ci * m + m) for ci in range(c) if row_used[ci]] or [np.zeros(0, np.int64)])
    full[pos] = sym_of_slot
    cum[pos] = starts[sym_of_slot]
    filled[pos] = True
    full[~filled] = np.arange(c * m)[~filled] // m * t
    fq = np.where(filled, flat[full], 1)
    slot = np.arange(c * m) % m
    dq = np.where(filled, slot - cum, 0)
    return full - (full // t) * t, fq, dq


def _apply_escapes(sym: np.ndarray, t: int, escapes: np.ndarray) -> np.ndarray:
    esc = sym == t - 1
    ne = int(esc.sum())
    if ne != escapes.size:
        raise HQFormatError(f"rANS stream has {ne} escaped symbols but {escapes.size} escape values")
    out = sym.astype(np.int32)
    if ne:
        if int(escapes.min()) < t - 1:
            raise HQFormatError(f"escape value below the table size {t - 1}")
        out[esc] = escapes
    return out


def stream_bits_exact(z: torch.Tensor, block: int, num_ctx: int = 1, prec: int = DEFAULT_PREC) -> int:
    """Exact stored bits of ``z`` coded as one rANS stream (encodes it)."""
    return 8 * encode_stream(z, block, num_ctx, prec).nbytes


# ---- torch twin ------------------------------------------------------------------------------------------
def decode_stream_torch(st: RansStream, num_ctx: int = 1) -> torch.Tensor:
    """Torch twin of :func:`decode_stream` (any device; the reference of ``kernels/rans_decode.py``):
    int32 (n,) symbols on the stream's device, the same values, the same HQFormatError checks."""
    freqs, t, m = check_tables(st, num_ctx)
    dev = st.words.device
    lut, fq, dq = (torch.from_numpy(a).to(dev) for a in _decode_tables(freqs, m))
    nfull, steps, tail = _layout(st.n, st.block)
    nb = nfull + (1 if tail else 0)
    if tuple(st.states.shape) != (nb, LANES) or tuple(st.offsets.shape) != (nb,):
        raise HQFormatError(f"rANS stream of {st.n} symbols needs {nb} blocks of states and offsets")
    x = st.states.to(torch.int64)
    ptr = st.offsets.to(torch.int64) - 1
    ends = torch.cat([st.offsets[1:].to(torch.int64), torch.tensor([st.words.numel()], device=dev)])
    if nb and (int(st.offsets[0]) != 0 or bool((ends < ptr + 1).any())):
        raise HQFormatError("rANS block offsets are not increasing from 0")
    wpad = torch.cat([st.words.to(torch.int64), torch.zeros(1, dtype=torch.int64, device=dev)])
    ctx_off = torch.from_numpy(contexts(num_ctx) * m).to(dev)
    total_steps = -(-st.n // LANES) - nfull * steps  # steps of the tail block
    out = torch.zeros(nb, steps if nfull else 0, LANES, dtype=torch.int64, device=dev)
    tail_out = torch.zeros(max(total_steps, 0), LANES, dtype=torch.int64, device=dev)
    mask = (1 << st.prec) - 1
    for s in range(max(steps if nfull else 0, total_steps)):
        act = torch.zeros(nb, LANES, dtype=torch.bool, device=dev)
        if nfull and s < steps:
            act[:nfull] = True
        if tail and s < total_steps:
            act[nfull, : min(LANES, tail - s * LANES)] = True
        idx = (x & mask) + ctx_off
        xn = fq[idx] * (x >> st.prec) + dq[idx]
        need = (xn < STATE_LOW) & act
        cs = torch.cumsum(need.to(torch.int64), 1)
        widx = (ptr.unsqueeze(1) + cs).clamp(max=wpad.numel() - 1)
        xn = torch.where(need, (xn << WORD_BITS) | wpad[widx], xn)
        x = torch.where(act, xn, x)
        ptr = ptr + cs[:, -1]
        if nfull and s < steps:
            out[:nfull, s] = idx[:nfull]
        if tail and s < total_steps:
            tail_out[s] = idx[nfull]
    if bool((x != STATE_LOW).any()) or bool((ptr + 1 != ends).any()):
        raise HQFormatError("rANS stream is corrupt: a block does not end in its initial state with its words "
                            "used up")
    flat = torch.cat([out[:nfull].reshape(-1), tail_out.reshape(-1)[: tail]])
    return apply_escapes_torch(lut[flat], t, st.escapes)


def apply_escapes_torch(sym: torch.Tensor, t: int, escapes: torch.Tensor) -> torch.Tensor:
    """Table entries ``sym`` (int (n,)) → int32 symbols: the escape entry ``t − 1`` replaced by ``escapes``
    (int32 (E,), stream order). HQFormatError when the counts differ or an escape value is below ``t − 1``."""
    dev = sym.device
    esc = sym == t - 1
    escapes = escapes.to(dev)
    if int(esc.sum()) != escapes.numel():
        raise HQFormatError(f"rANS stream has {int(esc.sum())} escaped symbols but {escapes.numel()} escape values")
    if escapes.numel() and int(escapes.min()) < t - 1:
        raise HQFormatError(f"escape value below the table size {t - 1}")
    sym = sym.to(torch.int32)
    sym[esc] = escapes
    return sym
