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

The CPU implementation is numpy, vectorized across all lanes of all blocks (one step of every lane per
numpy operation); :func:`decode_stream_torch` is the torch twin (same result on any device), the
reference of the Triton decoder in ``kernels/rans_decode.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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


def build_tables(z: np.ndarray, num_ctx: int, prec: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Table size T and frequencies int64 (C, T) for the symbols ``z`` (int32 (n,))."""
    top = int(z.max()) if z.size else 0
    t = min(top, MAX_TABLE - 2) + 2
    sym = np.minimum(z, t - 1)
    ctx = contexts(num_ctx)
    lane_ctx = np.resize(ctx, z.size) if z.size else np.zeros(0, np.int64)
    counts = np.bincount(lane_ctx * t + sym, minlength=num_ctx * t).reshape(num_ctx, t)
    freqs = np.stack([quantize_freqs(c, prec) for c in counts])
    return t, freqs


def table_cost_bits(z: np.ndarray, num_ctx: int, prec: int = DEFAULT_PREC) -> float:
    """Estimated payload bits of ``z`` (int32 (n,)) under its own quantized tables: Σ log2(M / f) plus
    32 bits per escape. Excludes states, offsets and the tables (see :func:`side_bits`)."""
    t, freqs = build_tables(z, num_ctx, prec, 1)
    sym = np.minimum(z, t - 1)
    counts = np.bincount(np.resize(contexts(num_ctx), z.size) * t + sym, minlength=num_ctx * t)
    f = freqs.reshape(-1).astype(np.float64)
    used = counts > 0
    return float((counts[used] * (prec - np.log2(f[used]))).sum()) + 32.0 * int(counts.reshape(num_ctx, t)[:, -1].sum())


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
    per block (a block codes ``LANES · block`` symbols)."""
    if z.dtype != torch.int32 or z.dim() != 1:
        raise ValueError(f"expected a 1-D int32 tensor, got {z.dtype} of shape {tuple(z.shape)}")
    if not PREC_RANGE[0] <= prec <= PREC_RANGE[1]:
        raise ValueError(f"prec must be in {PREC_RANGE}, got {prec}")
    zn = z.detach().cpu().numpy()
    if zn.size and int(zn.min()) < 0:
        raise ValueError("rANS symbols must be non-negative")
    n = zn.size
    t, freqs = build_tables(zn, num_ctx, prec, block)
    cum = np.zeros_like(freqs)
    cum[:, 1:] = np.cumsum(freqs, axis=1)[:, :-1]
    sym = np.minimum(zn, t - 1).astype(np.int64)
    escapes = zn[zn >= t - 1].astype(np.int32)
    ctx_off = contexts(num_ctx) * t
    fq, cm = freqs.reshape(-1), cum.reshape(-1)
    nfull, steps, tail = _layout(n, block)
    parts = []
    if nfull:
        parts.append(_encode_blocks(sym[: nfull * LANES * steps].reshape(nfull, steps, LANES), LANES,
                                    fq, cm, ctx_off, prec))
    if tail:
        ts = -(-tail // LANES)
        padded = np.zeros(ts * LANES, np.int64)
        padded[:tail] = sym[nfull * LANES * steps:]
        parts.append(_encode_blocks(padded.reshape(1, ts, LANES), tail - (ts - 1) * LANES, fq, cm, ctx_off, prec))
    states = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, LANES), np.uint32)
    counts = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    words = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.uint16)
    offsets = np.zeros(len(counts), np.int64)
    offsets[1:] = np.cumsum(counts)[:-1]
    return RansStream(n, block, prec, torch.from_numpy(freqs.astype(np.uint16)),
                      torch.from_numpy(states.astype(np.uint32)), torch.from_numpy(offsets.astype(np.uint32)),
                      torch.from_numpy(words), torch.from_numpy(escapes))


def _encode_blocks(sym: np.ndarray, last: int, fq, cm, ctx_off, prec: int):
    """Encode (nb, S, K) symbols (lanes ``≥ last`` of the last step are absent) → states uint32 (nb, K),
    word counts (nb,), words uint16 in decoder order. Works step-major ((S, nb, K), so each step is one
    contiguous slice); states are int64 (exact below 2**32) and ``x // f`` runs as a float64 division, exact
    for these magnitudes (a quotient's error is below 2**-20 < 1/f)."""
    nb, steps, k = sym.shape
    x = np.full((nb, k), STATE_LOW, np.int64)
    g = np.ascontiguousarray((sym + ctx_off).transpose(1, 0, 2))  # (S, nb, K) index into the flat tables
    f_all, c_all = fq[g], cm[g]
    ff_all = f_all.astype(np.float64)
    xmax_all = ((STATE_LOW >> prec) << WORD_BITS) * f_all
    words = np.zeros((steps, nb, k), np.uint16)
    emit = np.zeros((steps, nb, k), bool)
    for t in range(steps - 1, -1, -1):
        w = last if t == steps - 1 else k
        if w == k:
            xs, f, ff, c, xm = x, f_all[t], ff_all[t], c_all[t], xmax_all[t]
        else:
            xs, f, ff, c, xm = x[:, :w], f_all[t, :, :w], ff_all[t, :, :w], c_all[t, :, :w], xmax_all[t, :, :w]
        e = xs >= xm
        emit[t, :, :w] = e
        words[t, :, :w] = xs
        xs = np.where(e, xs >> WORD_BITS, xs)
        q = np.floor_divide(xs, ff).astype(np.int64)
        xs = (q << prec) + c + xs - q * f
        if w == k:
            x = xs
        else:
            x[:, :w] = xs
    emit_b = emit.transpose(1, 0, 2)
    return x.astype(np.uint32), emit_b.sum((1, 2)), words.transpose(1, 0, 2)[emit_b]


def decode_stream(st: RansStream, num_ctx: int = 1) -> torch.Tensor:
    """Decode a :class:`RansStream` to int32 (n,) symbols (numpy, CPU). HQFormatError on inconsistent data
    (tables that do not sum to M, a block that does not end at ``L`` with its words used up, escapes)."""
    freqs, t, m = check_tables(st, num_ctx)
    states = st.states.cpu().numpy().astype(np.int64)
    offsets = st.offsets.cpu().numpy().astype(np.int64)
    words = st.words.cpu().numpy()
    nfull, steps, tail = _layout(st.n, st.block)
    nb = nfull + (1 if tail else 0)
    if states.shape != (nb, LANES) or offsets.shape != (nb,):
        raise HQFormatError(f"rANS stream of {st.n} symbols needs {nb} blocks of states and offsets")
    ends = np.append(offsets[1:], len(words))
    if nb and (offsets[0] != 0 or np.any(ends < offsets)):
        raise HQFormatError("rANS block offsets are not increasing from 0")
    lut_slot, fq, dq = _decode_tables(freqs, m)
    ctx_off = contexts(num_ctx) * m
    wpad = np.append(words, np.uint16(0)).astype(np.int64)
    out = np.empty(st.n, np.int64)
    if nfull:
        sl = slice(0, nfull)
        out[: nfull * LANES * steps] = _decode_blocks(states[sl], offsets[sl], ends[sl], steps, LANES, wpad,
                                                      lut_slot, fq, dq, ctx_off, st.prec).reshape(-1)
    if tail:
        ts = -(-tail // LANES)
        sl = slice(nfull, nb)
        res = _decode_blocks(states[sl], offsets[sl], ends[sl], ts, tail - (ts - 1) * LANES, wpad,
                             lut_slot, fq, dq, ctx_off, st.prec)
        out[nfull * LANES * steps:] = res.reshape(-1)[:tail]
    g = out
    sym = (lut_slot[g] if g.size else g).astype(np.int64)
    return torch.from_numpy(_apply_escapes(sym, t, st.escapes.cpu().numpy()))


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


_TRI = np.triu(np.ones((LANES, LANES), np.float32))  # need (nb, K) @ _TRI = inclusive prefix count


def _decode_blocks(x, offs, ends, steps, last, wpad, lut, fq, dq, ctx_off, prec):
    """Decode (nb, K) states → flat table slots int64 (nb, steps, K). Checks each block's end state and
    word count (HQFormatError). ``wpad``: int64 words with one extra zero (reads past the end are clipped
    and then rejected by the end check)."""
    nb = len(x)
    x = x.astype(np.int64)
    ptr = offs.astype(np.int64) - 1
    outs = np.zeros((nb, steps, LANES), np.int64)
    mask = (1 << prec) - 1
    top = len(wpad) - 1
    for t in range(steps):
        w = last if t == steps - 1 else LANES
        xs = x if w == LANES else x[:, :w]
        idx = (xs & mask) + ctx_off[:w]
        outs[:, t, :w] = idx
        xs = fq[idx] * (xs >> prec) + dq[idx]
        need = xs < STATE_LOW
        cs = (need.astype(np.float32) @ _TRI[:w, :w]).astype(np.int64)
        widx = np.minimum(ptr[:, None] + cs, top)
        xs = np.where(need, (xs << WORD_BITS) | wpad[widx], xs)
        ptr += cs[:, -1]
        if w == LANES:
            x = xs
        else:
            x[:, :w] = xs
    if np.any(x != STATE_LOW) or np.any(ptr + 1 != ends):
        raise HQFormatError("rANS stream is corrupt: a block does not end in its initial state with its words "
                            "used up")
    return outs


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
