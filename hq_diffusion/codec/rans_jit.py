"""Compiled (numba) step loops of the rANS coder: the same bitstream as the numpy coder of :mod:`.rans`, byte
for byte (docs/ARCHITECTURE.md, "The rANS coder").

The numpy coder of :mod:`.rans` vectorizes across the lanes of every block but must walk the ``block``
sequential steps of a stream one vector call at a time (about 14 numpy calls per decode step), which makes
small and medium tensors slow. Here the loops run symbol by symbol in machine code: one block after the
other, inside a block its symbols in stream order (symbol ``i`` is lane ``i mod 8``, step ``i div 8``), so a
block's lanes read (decoder) and emit (encoder, backwards) their words in exactly the numpy coder's order.

- :func:`encode_blocks` runs every block backwards from its last symbol, writes the block's words to a
  scratch buffer in reverse emission order and copies them reversed (step, then lane, ascending: the
  decoder's order) behind the previous block's words.
- :func:`decode_symbols` runs every block forwards from its stored states and writes int32 symbols with the
  escapes already substituted.

Safety: numba does not bounds-check array accesses, so every index that stored data can steer is checked
inside the loops: the decoder's word reads stay inside their block's word range (the block offsets are
validated in Python first), escape reads inside the escape array, and table indices are ``slot | context·M``
with ``slot < M`` (the tables are built from validated frequencies with exactly ``C · M`` entries). A
violation returns a negative status that :mod:`.rans` turns into :class:`~.errors.HQFormatError`; the loops
are bounded by the symbol count, so a corrupt stream can neither hang nor read out of bounds.

The loops are serial (no ``parallel=True``: ``hq-diffusion quantize --workers`` forks worker processes, and
a threaded numba runtime does not survive a fork) and release the GIL (``nogil=True``). They are compiled
on first use and cached on disk (``cache=True``). :mod:`.rans` imports this module only when the rANS coder
runs on the CPU, so importing the codec does not import numba. numba is a dependency of the package; if it
cannot be imported, using the compiled coder raises :class:`ImportError` naming the fix — there is no silent
fallback to the numpy coder, which is 10-50x slower (``hq_diffusion.codec._np.CPU_IMPL = "numpy"`` selects
it explicitly).
"""
from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError as e:  # pragma: no cover - numba is a dependency; this module is imported on first use
    raise ImportError("the compiled rANS coder needs numba>=0.68 (a dependency of hq-diffusion: pip install "
                      "'numba>=0.68'); to run the much slower numpy reference coder instead, set "
                      "hq_diffusion.codec._np.CPU_IMPL = 'numpy'") from e

#: Status codes of :func:`decode_symbols` (0 = success).
OK = 0
ERR_WORDS = -1  # a lane read past its block's words
ERR_END = -2  # a block did not end with every lane at L and its words used up
ERR_ESCAPE_COUNT = -3  # more escape entries than escape values, or fewer
ERR_ESCAPE_VALUE = -4  # an escape value below T − 1
ERR_LAYOUT = -5  # block offsets outside the word array (checked in Python before; defensive)
MESSAGES = {
    ERR_WORDS: "a block reads past its words",
    ERR_END: "a block does not end in its initial state with its words used up",
    ERR_ESCAPE_COUNT: "the escaped symbols and the escape values differ in number",
    ERR_ESCAPE_VALUE: "an escape value is below the table size",
    ERR_LAYOUT: "block offsets outside the word array",
}


@numba.njit(cache=True, nogil=True)
def _encode_loop(z, t, two_ctx, block, fq, cm, prec, low, states, offsets, words, scratch):
    """Encode int32 symbols ``z`` (n,) block by block.

    fq, cm: int64 (C·T,) frequency and cumulative frequency per flat table index (context c, entry e at
    ``c·T + e``). states: uint32 (NB, 8) out (final states); offsets: int64 (NB,) out (first word of each
    block); words: uint16 (≥ n,) out; scratch: uint16 (≥ 8·block,) work space. Returns the number of words.
    At most one word is emitted per symbol (a 32-bit state, 16-bit words), so ``words`` of n entries and
    ``scratch`` of one block's symbols always suffice."""
    n = z.shape[0]
    per = 8 * block
    nb = (n + per - 1) // per
    m = np.int64(1) << prec
    hi_shift = 32 - prec
    x = np.empty(8, np.int64)
    pos = 0
    for b in range(nb):
        base = b * per
        cnt = min(per, n - base)
        for k in range(8):
            x[k] = low
        nw = 0
        for i in range(cnt - 1, -1, -1):
            lane = i & 7
            e = np.int64(z[base + i])
            if e > t - 1:
                e = t - 1
            if two_ctx and lane == 7:
                e += t
            f = fq[e]
            xl = x[lane]
            if xl >= (f << hi_shift):
                scratch[nw] = np.uint16(xl & 0xFFFF)
                nw += 1
                xl >>= 16
            x[lane] = xl + (xl // f) * (m - f) + cm[e]
        offsets[b] = pos
        for j in range(nw):
            words[pos + j] = scratch[nw - 1 - j]
        pos += nw
        for k in range(8):
            states[b, k] = np.uint32(x[k])
    return pos


@numba.njit(cache=True, nogil=True, inline="always")
def _lane_step(x, lane, off, tab, mask, prec, low, words, ptr, last):
    """One decode step of lane ``lane`` (state ``x[lane]`` updated in place): returns (the new word pointer,
    the table entry). Renormalizes without a branch: always loads the word at ``min(ptr, last)``, selects,
    advances the pointer by 0 or 1 (the caller rejects a pointer past its block's words)."""
    xl = x[lane]
    p = tab[(xl & mask) + off]  # < C·M: the slot is ≤ mask, off is 0 or M
    xl = (p >> 40) * (xl >> prec) + (p & 0xFFFF)
    need = xl < low
    w = np.int64(words[min(ptr, last)])
    x[lane] = ((xl << 16) | w) if need else xl
    return ptr + need, (p >> 16) & 0xFF


@numba.njit(cache=True, nogil=True)
def _decode_loop(n, block, states, offsets, ends, words, tab, two_ctx, prec, low, t, escapes, out):
    """Decode ``n`` symbols into ``out`` int32 (n,); returns a status (0, or one of the ``ERR_*`` codes).

    states: uint32 (NB, 8); offsets, ends: int64 (NB,) word range of each block (validated: 0 = offsets[0],
    offsets ≤ ends ≤ len(words)); words: uint16 (W ≥ 1,); tab: int64 (C·M,) per ``slot + context · M`` the
    packed ``f << 40 | entry << 16 | (slot − cum)`` (f ≤ 2**15, entry < 256, slot − cum < 2**15); escapes:
    int32 (E,).

    A block's whole steps are a fixed sequence of its 8 lanes (lane 7 reads the second context's table when
    there are two), its last partial step lane by lane; the table entries are written as they are, and the
    escape entries of a block are replaced by the escape values in a second pass over the block, only when it
    has any."""
    per = 8 * block
    nb = (n + per - 1) // per
    m = np.int64(1) << prec
    mask = m - 1
    nwords = words.shape[0]
    nesc = escapes.shape[0]
    esc = t - 1
    ei = 0
    c7 = m if two_ctx else np.int64(0)  # table offset of lane 7 (E8's parity coordinate: second context)
    x = np.empty(8, np.int64)
    for b in range(nb):
        base = b * per
        cnt = min(per, n - base)
        ptr = offsets[b]
        end = ends[b]
        if ptr < 0 or end > nwords or end < ptr:
            return ERR_LAYOUT
        last = max(end - 1, 0)  # a valid index: words holds at least one entry
        for k in range(8):
            x[k] = np.int64(states[b, k])
        full = cnt // 8
        seen = 0
        for s in range(full):
            o = base + 8 * s
            for lane in range(7):
                ptr, e = _lane_step(x, lane, 0, tab, mask, prec, low, words, ptr, last)
                out[o + lane] = np.int32(e)
                seen += e == esc
            ptr, e = _lane_step(x, 7, c7, tab, mask, prec, low, words, ptr, last)
            out[o + 7] = np.int32(e)
            seen += e == esc
            if ptr > end:  # a lane wanted a word past the block's words
                return ERR_WORDS
        o = base + 8 * full
        for lane in range(cnt - 8 * full):  # the tail block's partial last step (lanes 0 … 6)
            ptr, e = _lane_step(x, lane, 0, tab, mask, prec, low, words, ptr, last)
            out[o + lane] = np.int32(e)
            seen += e == esc
        if ptr != end:
            return ERR_END
        for k in range(8):
            if x[k] != low:
                return ERR_END
        if seen:
            for i in range(base, base + cnt):
                if out[i] == esc:
                    if ei >= nesc:
                        return ERR_ESCAPE_COUNT
                    v = escapes[ei]
                    ei += 1
                    if v < esc:
                        return ERR_ESCAPE_VALUE
                    out[i] = v
    if ei != nesc:
        return ERR_ESCAPE_COUNT
    return OK


def encode_blocks(zn: np.ndarray, t: int, num_ctx: int, block: int, freqs: np.ndarray, prec: int, low: int):
    """Compiled twin of ``rans._encode_blocks``: symbols int32 (n,) (n ≥ 1), tables int64 (C, T) →
    (final states uint32 (NB, 8), block offsets int64 (NB,), words uint16 (W,))."""
    n = zn.size
    nb = -(-n // (8 * block))
    fq = np.ascontiguousarray(freqs.reshape(-1), np.int64)
    cm = np.ascontiguousarray((np.cumsum(freqs, axis=1) - freqs).reshape(-1), np.int64)
    states = np.empty((nb, 8), np.uint32)
    offsets = np.empty(nb, np.int64)
    words = np.empty(n, np.uint16)  # the bound (one word per symbol); only the pages written are touched
    scratch = np.empty(min(n, 8 * block), np.uint16)
    nw = _encode_loop(np.ascontiguousarray(zn, np.int32), t, num_ctx == 2, block, fq, cm, prec, low, states,
                      offsets, words, scratch)
    return states, offsets, words[:nw].copy()


def decode_symbols(n: int, block: int, states: np.ndarray, offsets: np.ndarray, ends: np.ndarray,
                   words: np.ndarray, lut: np.ndarray, fq: np.ndarray, dq: np.ndarray, num_ctx: int, prec: int,
                   low: int, t: int, escapes: np.ndarray) -> tuple[np.ndarray, int]:
    """Run the compiled decoder: (int32 (n,) symbols, status). The caller validates the layout (offsets,
    state shape) and the tables (``lut``/``fq``/``dq`` of ``num_ctx · 2**prec`` entries) and maps a nonzero
    status to HQFormatError (:data:`MESSAGES`)."""
    m = 1 << prec
    for name, a in (("lut", lut), ("fq", fq), ("dq", dq)):
        if a.shape != (num_ctx * m,):
            raise ValueError(f"rANS decode table {name} has shape {a.shape}, expected ({num_ctx * m},)")
    tab = (fq.astype(np.int64) << 40) | (lut.astype(np.int64) << 16) | dq.astype(np.int64)
    out = np.empty(n, np.int32)
    if not words.size:  # one dummy word: every read is then past the (empty) word ranges and rejected
        if np.any(ends != 0):
            return out, ERR_LAYOUT
        words = np.zeros(1, np.uint16)
    status = _decode_loop(n, block, np.ascontiguousarray(states, np.uint32), np.ascontiguousarray(offsets, np.int64),
                          np.ascontiguousarray(ends, np.int64), np.ascontiguousarray(words, np.uint16), tab,
                          num_ctx == 2, prec, low, t, np.ascontiguousarray(escapes, np.int32), out)
    return out, int(status)
