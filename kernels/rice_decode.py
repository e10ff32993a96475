"""Rice decode of an :class:`~hq_diffusion.codec.EncodedTensor`, fused with un-stripping and lattice
reconstruction, to int8 lattice integers or bf16 ``p(Y) / α · scale`` in the rotated basis.

Legend: R rows, K = n_pad, D the lattice dimension (8, 4, 2, 1), NB blocks of B symbols per stream, VG
vectors per group, S streams (1 or 2; D_s symbols of stream s per vector: e8 (8), d4 (3, 1), a2 (1, 1), z (1)).

Design
------
*Groups.* The work is cut into groups of VG consecutive lattice vectors such that, in every stream, the
group's symbols are whole Rice blocks (``D_s · VG`` a multiple of B). A group's unary bits are then the
contiguous range ``[offsets[first block], offsets[last block + 1])`` given by the stored block offsets, so a
program can start anywhere without parsing what comes before. The grid is persistent: program p handles
groups p, p + P, … and owns one row of a small scratch buffer (P × Σ_s D_s·VG bytes, L2-resident).

*Phase 1 — unary scan (per stream).* The group's bit range is walked in chunks of CBY bytes, expanded to
8·CBY bit lanes. An inclusive ``tl.cumsum`` of the bits gives each one-bit its rank (= the group-local
index of the symbol it ends). The quotient of that symbol is the run of zeros right before it, at most
ESC = 32 long by construction of the format, so it is the leading-zero count of the 32 bits before the
one-bit (a 40-bit window from five byte loads, all L1 hits): no second scan and no neighbour exchange. Each
symbol end stores its quotient (≤ ESC) into the uint8 scratch at its rank (a scatter whose ranks are
monotone, so the stores coalesce).

*Escapes.* A quotient of ESC means "escaped": its full value is the next entry of the stream's int32
``escapes`` array. Which entry needs the number of escapes in all earlier groups, which the format does not
store. When a stream has escapes (rare: quotients ≥ 32), a first launch runs phase 1 only and counts the
escapes of every group (MODE_COUNT); a torch ``cumsum`` gives each group its first escape index; the
decode launch then resolves escape ordinals within the group with a cumsum over escape lanes and writes the
full quotient into an int32 side scratch (touched only at escaped symbols). With no escapes (the usual case)
the count launch is skipped.

*Phase 2 — symbols, un-stripping, output.* After a barrier, tiles of TV vectors read their quotients from
scratch, their remainders directly from the fixed-width remainder stream (symbol j of block b starts at bit
``(j mod 8)·k_b`` of byte ``rbs[b] + ((j mod B) >> 3)·k_b``; ``rbs`` is the prefix sum of the block sizes
``k_b·B/8``, computed on the host from ``ks``), form ``z = q << k | r``, undo the zigzag and the bit
stripping per lattice (E8 parity and coset bit, D4 parity, A2 coset) and store int8 codes or the scaled
value (float32 math, rounded once to bf16).

The kernels trust the payload (``EncodedTensor.from_bytes`` checks a CRC, ``codec.decode`` validates
everything): the host checks only what memory safety needs (k ≤ KMAX, block offsets increasing inside the
unary stream, once per cached plan), and every other load and store is masked to its buffer, so a corrupt
in-memory stream decodes to garbage but never reads or writes out of bounds.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hq_diffusion.codec.errors import HQFormatError
from hq_diffusion.codec.format import LATTICE_IDS
from hq_diffusion.codec.lattice import LATTICES
from hq_diffusion.codec.ops_ref import row_dequant_scale
from hq_diffusion.codec.rice import ESC, KMAX
from hq_diffusion.codec.strip import stream_lengths

from ._jit import cast_out, clz32, interpreting, max_programs, unzigzag

LATTICE_CODES = LATTICE_IDS  # the LAT constexpr of the kernels: e8 0, d4 1, a2 2, z 3
# lattice → (dimension D, symbols per vector in each stream): e8 (8, (8,)), d4 (4, (3, 1)), a2 (2, (1, 1)), z (1, (1,))
LAYOUT = {name: (info.dim, tuple(stream_lengths(name, info.dim))) for name, info in LATTICES.items()}
MODE_CODES, MODE_ROTATED, MODE_COUNT = 0, 1, 2


# ---- device code -------------------------------------------------------------------------------------------


@triton.jit
def scan_unary(un_ptr, gstart, gend, nsym, qscr, xscr, esc_ptr, ebase, nesc,
               COUNT: tl.constexpr, HAS_ESC: tl.constexpr, CBY: tl.constexpr, ESC: tl.constexpr):
    """Phase 1 for one stream of one group: unary bits ``[gstart, gend)`` → quotients in scratch.

    un_ptr: uint8 unary stream; nsym: symbols of the group in this stream; qscr: uint8 scratch (nsym,);
    xscr: int32 scratch (nsym,) receiving the full quotient of escaped symbols; esc_ptr: int32 escapes (nesc,);
    ebase: index of the group's first escape. Returns the number of escapes of the group (int32).

    A one-bit at p ends a symbol whose quotient is the run of zeros right before p, which is at most ESC
    long: the leading zeros of the 32 bits ``[p − 32, p)`` (ESC = 32 exactly when all of them are zero, the
    escape). The bit before a group is a symbol end, so runs never leak across groups; bits before the
    stream read as ones."""
    byte0 = gstart >> 3
    byte1 = (gend + 7) >> 3
    t = tl.arange(0, 8)[None, :]
    ones = gstart * 0
    nes = gstart * 0
    for cb in range(byte0, byte1, CBY):
        m = cb + tl.arange(0, CBY)
        inb = m < byte1
        cur = tl.load(un_ptr + m, mask=inb, other=0).to(tl.uint32)
        lo = tl.load(un_ptr + m - 1, mask=inb & (m >= 1), other=255).to(tl.uint32) << 24
        lo = lo | (tl.load(un_ptr + m - 2, mask=inb & (m >= 2), other=255).to(tl.uint32) << 16)
        lo = lo | (tl.load(un_ptr + m - 3, mask=inb & (m >= 3), other=255).to(tl.uint32) << 8)
        lo = lo | tl.load(un_ptr + m - 4, mask=inb & (m >= 4), other=255).to(tl.uint32)
        # bits [8m + t − 32, 8m + t) with bit 8m + t − 1 on top
        win = (lo[:, None] >> t) | ((cur[:, None] << (31 - t)) << 1)
        bit = ((cur[:, None] >> t) & 1).to(tl.int32)
        i = m[:, None] * 8 + t
        bit = tl.where((i >= gstart) & (i < gend), bit, 0)
        bit = tl.reshape(bit, (CBY * 8,))
        win = tl.reshape(win, (CBY * 8,))
        rank = ones + tl.cumsum(bit, 0) - bit  # symbol ends before this lane = index of the symbol it ends
        end = (bit == 1) & (rank < nsym)
        esc = end & (win == 0)
        if COUNT:
            nes += tl.sum(esc.to(tl.int32), 0)
        else:
            tl.store(qscr + rank, clz32(win).to(tl.uint8), mask=end)
            if HAS_ESC:
                e = esc.to(tl.int32)
                idx = ebase + nes + tl.cumsum(e, 0) - e
                ev = tl.load(esc_ptr + idx, mask=esc & (idx < nesc), other=ESC)
                tl.store(xscr + rank, ev, mask=esc)
                nes += tl.sum(e, 0)
        ones += tl.sum(bit, 0)
    return nes


@triton.jit
def stream_symbols(jg, jl, mask, qscr, xscr, ks_ptr, rbs_ptr, rem_ptr, nrem,
                   B: tl.constexpr, HAS_ESC: tl.constexpr, ESC: tl.constexpr):
    """Phase 2: full symbols ``z = q << k | r`` (int32) at global stream indices ``jg`` (group-local ``jl``)."""
    q = tl.load(qscr + jl, mask=mask, other=0, cache_modifier=".cg").to(tl.int32)
    if HAS_ESC:
        big = mask & (q >= ESC)
        q = tl.where(big, tl.load(xscr + jl, mask=big, other=0, cache_modifier=".cg"), q)
    b = jg // B
    k = tl.load(ks_ptr + b, mask=mask, other=0).to(tl.int32)
    rb = tl.load(rbs_ptr + b, mask=mask, other=0)
    bo = (jg & 7) * k
    byte = rb + ((jg & (B - 1)) >> 3) * k + (bo >> 3)
    mk = mask & (k > 0)
    w = tl.load(rem_ptr + byte, mask=mk & (byte < nrem), other=0).to(tl.int32)
    w = w | (tl.load(rem_ptr + byte + 1, mask=mk & (byte + 1 < nrem), other=0).to(tl.int32) << 8)
    w = w | (tl.load(rem_ptr + byte + 2, mask=mk & (byte + 2 < nrem), other=0).to(tl.int32) << 16)
    w = w | (tl.load(rem_ptr + byte + 3, mask=mk & (byte + 3 < nrem), other=0).to(tl.int32) << 24)
    r = (w >> (bo & 7)) & ((1 << k) - 1)  # bo & 7 + k ≤ 31: the sign bit of w is never kept
    return (q << k) | r


@triton.jit
def lattice_points(v, c, vmask, gv0, scr0, scr1, xs0, xs1,
                   ks0, rbs0, rem0, nrem0, ks1, rbs1, rem1, nrem1,
                   LAT: tl.constexpr, D: tl.constexpr, B: tl.constexpr, HAS_ESC: tl.constexpr, ESC: tl.constexpr):
    """Lattice integers int32 (V, D) of the vectors ``v`` (int32 (V, 1), global indices; ``c`` = arange(D)[None]).

    Reads the quotients of the current group (first vector ``gv0``) from the scratch of stream 0/1."""
    m = vmask & (c < D)
    if LAT == 0:  # e8: zz(s1..s7), 2·zz(t) + c
        sym = stream_symbols(v * 8 + c, (v - gv0) * 8 + c, m, scr0, xs0, ks0, rbs0, rem0, nrem0, B, HAS_ESC, ESC)
        is7 = c == 7
        s8 = tl.sum(tl.where(is7, sym, 0), 1)[:, None]
        coset = s8 & 1
        s = unzigzag(sym)
        par = tl.sum(tl.where(is7, 0, s), 1)[:, None] & 1
        s = tl.where(is7, (unzigzag(s8 >> 1) << 1) + par, s)
        y = (s << 1) + coset
    elif LAT == 1:  # d4: stream 0 zz(s1..s3), stream 1 zz(t)
        in3 = c < 3
        z0 = stream_symbols(v * 3 + c, (v - gv0) * 3 + c, m & in3, scr0, xs0, ks0, rbs0, rem0, nrem0,
                            B, HAS_ESC, ESC)
        z1 = stream_symbols(v, v - gv0, vmask, scr1, xs1, ks1, rbs1, rem1, nrem1, B, HAS_ESC, ESC)
        s = unzigzag(z0)
        par = tl.sum(tl.where(in3, s, 0), 1)[:, None] & 1
        s4 = (unzigzag(z1) << 1) + par
        y = tl.where(in3, s, s4) << 1
    elif LAT == 2:  # a2: stream 0 zz(t_y), stream 1 zz(n_x)
        z0 = stream_symbols(v, v - gv0, vmask, scr0, xs0, ks0, rbs0, rem0, nrem0, B, HAS_ESC, ESC)
        z1 = stream_symbols(v, v - gv0, vmask, scr1, xs1, ks1, rbs1, rem1, nrem1, B, HAS_ESC, ESC)
        nx = unzigzag(z1)
        ny = (unzigzag(z0) << 1) + (nx & 1)
        y = tl.where(c == 0, ny, nx)
    else:  # z
        y = unzigzag(stream_symbols(v + c, v - gv0 + c, m, scr0, xs0, ks0, rbs0, rem0, nrem0, B, HAS_ESC, ESC))
    return y


@triton.jit
def program_scratch(qscr, xscr, vg, D0: tl.constexpr, D1: tl.constexpr, HAS_ESC: tl.constexpr):
    """This program's rows of the uint8 quotient scratch and (with escapes) of the int32 escape scratch:
    (D0 + D1)·vg entries each, at program id × that."""
    gs = (D0 + D1) * vg
    pid = tl.program_id(0)
    qrow = qscr + pid * gs
    xrow = xscr
    if HAS_ESC:
        xrow = xscr + pid * gs
    return qrow, xrow


@triton.jit
def scan_stream(g, v0, nvg, qrow, xrow, cnt_ptr, bit_ptr, un_ptr, esc_ptr, eb_ptr, nesc,
                DS: tl.constexpr, B: tl.constexpr, COUNT: tl.constexpr, HAS_ESC: tl.constexpr,
                CBY: tl.constexpr, ESC: tl.constexpr):
    """Phase 1 of one stream (DS symbols per vector) for the ``nvg`` vectors of group ``g`` starting at
    ``v0``: its unary range runs from the offset of its first block to that of the block after its last;
    in COUNT mode the escape count is stored at ``cnt_ptr + g``."""
    first = DS * v0
    n = DS * nvg
    gs = tl.load(bit_ptr + first // B)
    ge = tl.load(bit_ptr + (first + n + B - 1) // B)
    eb = 0
    if HAS_ESC:
        eb = tl.load(eb_ptr + g)
    c = scan_unary(un_ptr, gs, ge, n, qrow, xrow, esc_ptr, eb, nesc, COUNT, HAS_ESC, CBY, ESC)
    if COUNT:
        tl.store(cnt_ptr + g, c)


@triton.jit
def scan_group(g, vg, nv, qrow, xrow, cnt_ptr, num_groups,
               ks0, bit0, un0, esc0, eb0, nesc0, ks1, bit1, un1, esc1, eb1, nesc1,
               D0: tl.constexpr, D1: tl.constexpr, NS: tl.constexpr, B: tl.constexpr,
               COUNT: tl.constexpr, HAS_ESC: tl.constexpr, CBY: tl.constexpr, ESC: tl.constexpr):
    """Phase 1 for every stream of group ``g`` (vectors ``[g·vg, min((g+1)·vg, nv))``); stream 1's
    quotients follow stream 0's D0·vg in the scratch rows, its escape counts the first num_groups."""
    v0 = g * vg
    nvg = tl.minimum(vg, nv - v0)
    scan_stream(g, v0, nvg, qrow, xrow, cnt_ptr, bit0, un0, esc0, eb0, nesc0, D0, B, COUNT, HAS_ESC, CBY, ESC)
    if NS == 2:
        scan_stream(g, v0, nvg, qrow + D0 * vg, xrow + D0 * vg, cnt_ptr + num_groups, bit1, un1, esc1, eb1,
                    nesc1, D1, B, COUNT, HAS_ESC, CBY, ESC)


@triton.jit
def _rice_decode_kernel(
    # stream 0 / stream 1 (a copy of stream 0 for one-stream lattices)
    ks0, rbs0, bit0, un0, rem0, esc0, eb0, nrem0, nesc0,
    ks1, rbs1, bit1, un1, rem1, esc1, eb1, nrem1, nesc1,
    # outputs and scratch
    out_ptr, ws_ptr, cnt_ptr, qscr, xscr,
    # sizes
    nv, K, vg, num_groups,
    # meta-parameters
    LAT: tl.constexpr, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, NS: tl.constexpr, B: tl.constexpr,
    MODE: tl.constexpr, HAS_ESC: tl.constexpr, CBY: tl.constexpr, TV: tl.constexpr, ESC: tl.constexpr,
):
    """Decode groups of VG vectors; persistent grid. out: (nv·D,) int8/int32 codes or float (MODE_ROTATED);
    ws: float32 (R,) scale / α; cnt: int32 (S, num_groups) escape counts (MODE_COUNT only);
    qscr: uint8 (P, (D0 + D1)·VG); xscr: int32 like qscr (only with escapes)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    qrow, xrow = program_scratch(qscr, xscr, vg, D0, D1, HAS_ESC)
    c = tl.arange(0, D)[None, :]
    for g in range(pid, num_groups, nprog):
        scan_group(g, vg, nv, qrow, xrow, cnt_ptr, num_groups,
                   ks0, bit0, un0, esc0, eb0, nesc0, ks1, bit1, un1, esc1, eb1, nesc1,
                   D0, D1, NS, B, MODE == 2, HAS_ESC, CBY, ESC)
        if MODE != 2:
            tl.debug_barrier()  # phase-1 scratch writes → visible to the whole program
            v0 = g * vg
            vend = tl.minimum(v0 + vg, nv)
            for t0 in range(v0, vend, TV):
                v = t0 + tl.arange(0, TV)[:, None]
                vmask = v < vend
                y = lattice_points(v, c, vmask, v0, qrow, qrow + D0 * vg, xrow, xrow + D0 * vg,
                                   ks0, rbs0, rem0, nrem0, ks1, rbs1, rem1, nrem1, LAT, D, B, HAS_ESC, ESC)
                e = v * D + c
                m = vmask & (c < D)
                if MODE == 0:
                    tl.store(out_ptr + e, y.to(out_ptr.dtype.element_ty), mask=m)
                else:
                    f = y.to(tl.float32)
                    if LAT == 2:
                        f = tl.where(c == 0, f * 1.7320508075688772, f)
                    f = f * tl.load(ws_ptr + e // K, mask=m, other=0.0)
                    tl.store(out_ptr + e, cast_out(f, out_ptr), mask=m)
            tl.debug_barrier()  # all scratch reads done before the next group overwrites it


# ---- host side ---------------------------------------------------------------------------------------------


@dataclass
class StreamPlan:
    """Device tensors of one stream, as the kernels read them (NB blocks)."""

    ks: torch.Tensor  # uint8 (NB,)
    rbs: torch.Tensor  # int32 (NB,) first remainder byte of each block
    bits: torch.Tensor  # int32 (NB + 1,) block bit offsets, then the unary length in bits
    unary: torch.Tensor  # uint8 (U,)
    rem: torch.Tensor  # uint8 (Σ k·B/8,)
    escapes: torch.Tensor  # int32 (max(E, 1),)
    nesc: int  # E


@dataclass
class GroupPlan:
    """How an encoded tensor is cut into groups of ``vg`` vectors, with each group's first escape index."""

    lattice: str
    dim: int
    per_vec: tuple[int, ...]
    block: int
    n_pad: int
    nv: int
    vg: int
    num_groups: int
    streams: list[StreamPlan]
    ebase: list[torch.Tensor] | None  # per stream int32 (num_groups,), None without escapes


def min_group(lattice: str, block: int) -> int:
    """Smallest VG whose symbols are whole blocks in every stream."""
    vg = 1
    while not group_aligned(lattice, block, vg):
        vg *= 2
    return vg


def group_aligned(lattice: str, block: int, vg: int) -> bool:
    return all((d * vg) % block == 0 for d in LAYOUT[lattice][1])


def _stream_plan(st) -> StreamPlan:
    ks = st.ks.contiguous()
    nb = ks.numel()
    dev = ks.device
    if nb and int(ks.max()) > KMAX:
        raise HQFormatError(f"Rice parameter {int(ks.max())} exceeds the maximum {KMAX}")
    off = st.offsets.to(torch.int64)
    if nb and (int(off[0]) != 0 or bool((off[1:] < off[:-1]).any()) or int(off[-1]) > st.unary.numel() * 8):
        raise HQFormatError("block offsets are not increasing within the unary stream")
    sizes = ks.to(torch.int64) * (st.block // 8)
    rbs = (torch.cumsum(sizes, 0) - sizes).to(torch.int32)
    bits = torch.empty(nb + 1, dtype=torch.int32, device=dev)
    bits[:nb] = st.offsets
    bits[nb] = st.unary.numel() * 8
    esc = st.escapes if st.escapes.numel() else torch.zeros(1, dtype=torch.int32, device=dev)
    return StreamPlan(ks, rbs.contiguous(), bits, st.unary.contiguous(), st.rem.contiguous(), esc.contiguous(),
                      st.escapes.numel())


class TensorCache:
    """Values attached to a tensor's identity (``id``) for as long as the tensor lives; tensors cannot be
    ``WeakKeyDictionary`` keys because their ``==`` is elementwise."""

    def __init__(self):
        self._d: dict[int, tuple] = {}

    def get(self, t: torch.Tensor):
        e = self._d.get(id(t))
        return e[1] if e is not None and e[0]() is t else None

    def set(self, t: torch.Tensor, value) -> None:
        k = id(t)
        self._d[k] = (weakref.ref(t, lambda _r, k=k, d=self._d: d.pop(k, None)), value)


_PLANS = TensorCache()


def _versions(q) -> tuple:
    return tuple((id(t), t._version) for s in q.streams for t in s.tensors().values())


def group_plan(q, vg: int) -> GroupPlan:
    """The :class:`GroupPlan` of ``q`` for groups of ``vg`` vectors, cached per stream tensors (re-derived when
    any of them changes in place). Runs the escape-count launch when a stream has escapes."""
    key = q.streams[0].ks
    versions = _versions(q)
    entry = _PLANS.get(key)
    if entry is not None and entry[0] == versions and vg in entry[1]:
        return entry[1][vg]
    if entry is None or entry[0] != versions:
        entry = (versions, {})
        _PLANS.set(key, entry)
    dim, per_vec = LAYOUT[q.lattice]
    if len(q.streams) != len(per_vec):
        raise HQFormatError(f"{q.lattice} needs {len(per_vec)} streams, found {len(q.streams)}")
    if not group_aligned(q.lattice, q.block, vg):
        raise ValueError(f"groups of {vg} vectors are not whole blocks of {q.block} symbols for {q.lattice}")
    nv = q.rows * q.n_pad // dim
    for d, st in zip(per_vec, q.streams):
        nb = -(-d * nv // q.block)
        if st.n != d * nv or st.block != q.block or st.ks.numel() != nb or st.offsets.numel() != nb:
            raise HQFormatError(f"stream of {st.n} symbols / {st.ks.numel()} blocks does not match a "
                                f"{q.lattice} tensor of {q.rows}×{q.n_pad} with blocks of {q.block}")
    streams = [_stream_plan(s) for s in q.streams]
    plan = GroupPlan(q.lattice, dim, per_vec, q.block, q.n_pad, nv, vg, -(-nv // vg), streams, None)
    if any(s.escapes.numel() for s in q.streams):
        counts = _launch(plan, MODE_COUNT, None, None)
        plan.ebase = [(torch.cumsum(c, 0) - c).to(torch.int32).contiguous() for c in counts]
    entry[1][vg] = plan
    return plan


@dataclass
class StreamArgs:
    """What the decode and fused kernels take from a :class:`GroupPlan`: the 18 per-stream arguments
    (stream 1 repeats stream 0 for one-stream lattices), each program's scratch (uint8 quotients; int32
    escaped quotients, one element when unused) and the constexprs ``D0``, ``D1``, ``NS``."""

    streams: tuple
    qscr: torch.Tensor
    xscr: torch.Tensor
    meta: dict


def stream_args(plan: GroupPlan, nprog: int, has_esc: bool) -> StreamArgs:
    """Arguments for a persistent grid of ``nprog`` programs over ``plan``'s groups."""
    s0 = plan.streams[0]
    s1 = plan.streams[1] if len(plan.streams) > 1 else s0
    dev = s0.ks.device
    ns = len(plan.per_vec)
    d0, d1 = plan.per_vec[0], (plan.per_vec[1] if ns > 1 else 0)
    gs = (d0 + d1) * plan.vg
    qscr = torch.empty(nprog * gs, dtype=torch.uint8, device=dev)
    xscr = torch.empty(nprog * gs if has_esc else 1, dtype=torch.int32, device=dev)
    eb0 = plan.ebase[0] if has_esc else s0.bits  # any int32 pointer when unused
    eb1 = plan.ebase[-1] if has_esc else s0.bits
    streams = (s0.ks, s0.rbs, s0.bits, s0.unary, s0.rem, s0.escapes, eb0, s0.rem.numel(), s0.nesc,
               s1.ks, s1.rbs, s1.bits, s1.unary, s1.rem, s1.escapes, eb1, s1.rem.numel(), s1.nesc)
    return StreamArgs(streams, qscr, xscr, dict(D0=d0, D1=d1, NS=ns))


def interpreter_chunk_bytes(plan: GroupPlan) -> int:
    """CBY in the interpreter, where lanes cost the same masked or not: one chunk ≈ a group's unary bytes."""
    per_group = max(s.unary.numel() for s in plan.streams) // plan.num_groups + 8
    return min(4096, triton.next_power_of_2(per_group))


def _launch(plan: GroupPlan, mode: int, out: torch.Tensor | None, ws: torch.Tensor | None):
    dev = plan.streams[0].ks.device
    has_esc = plan.ebase is not None and mode != MODE_COUNT
    nprog = min(plan.num_groups, max_programs(dev))
    sa = stream_args(plan, nprog, has_esc)
    cnt = (torch.zeros(len(plan.per_vec), plan.num_groups, dtype=torch.int32, device=dev)
           if mode == MODE_COUNT else sa.qscr)
    if interpreting():  # few, large steps: the interpreter pays per operation
        cby = interpreter_chunk_bytes(plan)
        tv = min(max(1, 8192 // plan.dim), triton.next_power_of_2(plan.vg))
    else:
        cby, tv = 128, max(1, 512 // plan.dim)
    _rice_decode_kernel[(nprog,)](
        *sa.streams, out if out is not None else sa.qscr, ws if ws is not None else sa.qscr, cnt, sa.qscr,
        sa.xscr, plan.nv, plan.n_pad, plan.vg, plan.num_groups,
        LAT=LATTICE_CODES[plan.lattice], D=plan.dim, B=plan.block, MODE=mode, HAS_ESC=has_esc, CBY=cby, TV=tv,
        ESC=ESC, **sa.meta)
    return cnt.unbind(0) if mode == MODE_COUNT else None


def decode_group_size(q) -> int:
    """VG for the decode kernel: whole blocks, at least ~8K (GPU) / 64K (interpreter) elements per group."""
    dim = LAYOUT[q.lattice][0]
    vg = min_group(q.lattice, q.block)
    target = (65536 if interpreting() else 8192) // dim
    while vg < target and vg * dim < q.rows * q.n_pad:
        vg *= 2
    return vg


def decode_launch(q, out: str = "codes", out_dtype: torch.dtype = torch.bfloat16,
                  group: int | None = None) -> torch.Tensor:
    """See :func:`hq_diffusion.codec.ops_ref.decode_ref`. Returns ``q.codes_shape`` codes or ``out_dtype`` values.

    ``group``: vectors per program step (a tuning/testing knob; default :func:`decode_group_size`)."""
    if out not in ("codes", "rotated"):
        raise ValueError(f"out must be 'codes' or 'rotated', got {out!r}")
    if q.lattice not in LAYOUT:
        raise HQFormatError(f"unknown lattice {q.lattice!r}")
    numel = q.rows * q.n_pad
    if numel >= 2**31:
        raise ValueError(f"tensor of {numel} codes is too large for int32 indexing")
    plan = group_plan(q, group or decode_group_size(q))
    dev = q.scales.device
    if out == "codes":
        res = torch.empty(numel, dtype=torch.int8 if q.fits_int8 else torch.int32, device=dev)
        _launch(plan, MODE_CODES, res, None)  # codes need no scales
        if not q.fits_int8:
            res = res.to(torch.int32 if int(res.abs().max()) > 32767 else torch.int16)
    else:
        if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
        res = torch.empty(numel, dtype=out_dtype, device=dev)
        _launch(plan, MODE_ROTATED, res, row_dequant_scale(q).contiguous())
    return res.reshape(q.codes_shape)
