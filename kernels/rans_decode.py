"""Triton decoder of rANS streams (``coder="rans"``, format version 2; :mod:`hq_diffusion.codec.rans`).

One program decodes one block: its ``LANES`` = 8 interleaved coders are one vector of 8 int64 states, and the
program walks the block's steps in order. Per step: the slot ``x mod M`` of every lane (plus the lane's
context offset) indexes three flat tables — the symbol's table entry, its frequency ``f`` and ``slot − cum``
(int32 (C·M,), built by ``rans._decode_tables``) — the state becomes ``f · (x >> prec) + slot − cum``, and the
lanes whose state fell below ``L = 2**16`` read the block's next words in lane order (an inclusive
``cumsum`` of the renormalizing lanes). A read past the block's end loads 0; each program stores its final
states and word position, and the launcher rejects a block that does not end at ``L`` with its words used
up (HQFormatError), exactly like the torch twin :func:`~hq_diffusion.codec.rans.decode_stream_torch`, which
is the reference the tests compare against (bit-exact, under ``TRITON_INTERPRET=1`` on CPU).

Escapes, the inverse stripping and the output (codes or rotated values) are torch on the device
(:func:`~hq_diffusion.codec.core.decode_symbols`). The fused decode+GEMM does not take rANS: its programs own
tiles of rows, which need not coincide with rANS blocks of ``8 · block`` symbols (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hq_diffusion.codec import rans
from hq_diffusion.codec.core import decode_symbols
from hq_diffusion.codec.errors import HQFormatError
from hq_diffusion.codec.format import rans_contexts

from . import _jit  # noqa: F401  (loader.kernel_module checks the interpreter mode the kernels were loaded with)


@triton.jit
def _rans_decode_kernel(states_ptr, offsets_ptr, ends_ptr, words_ptr, fq_ptr, dq_ptr, lut_ptr, ctx_ptr,
                        out_ptr, fin_ptr, n, steps, PREC: tl.constexpr, K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, K)
    x = tl.load(states_ptr + b * K + lanes)
    ptr = tl.load(offsets_ptr + b) - 1
    end = tl.load(ends_ptr + b)
    ctx = tl.load(ctx_ptr + lanes)
    base = b * steps * K
    for t in range(steps):
        pos = base + t * K + lanes
        act = pos < n
        idx = (x & ((1 << PREC) - 1)) + ctx
        f = tl.load(fq_ptr + idx).to(tl.int64)
        d = tl.load(dq_ptr + idx).to(tl.int64)
        s = tl.load(lut_ptr + idx)
        xn = f * (x >> PREC) + d
        need = (xn < 65536) & act
        widx = ptr + tl.cumsum(need.to(tl.int64), 0)
        w = tl.load(words_ptr + widx, mask=need & (widx < end), other=0).to(tl.int64)
        xn = tl.where(need, (xn << 16) | w, xn)
        x = tl.where(act, xn, x)
        ptr += tl.sum(need.to(tl.int64), 0)
        tl.store(out_ptr + pos, s, mask=act)
    tl.store(fin_ptr + b * (K + 1) + lanes, x)
    tl.store(fin_ptr + b * (K + 1) + K, ptr + 1)


def symbols_launch(st: rans.RansStream, num_ctx: int) -> torch.Tensor:
    """Decode one rANS stream on its device: int32 (n,) symbols (≡ ``rans.decode_stream_torch``)."""
    freqs, t, m = rans.check_tables(st, num_ctx)
    dev = st.words.device
    lut, fq, dq = (torch.from_numpy(a).to(device=dev, dtype=torch.int32) for a in rans._decode_tables(freqs, m))
    nb = rans.num_blocks(st.n, st.block)
    if tuple(st.states.shape) != (nb, rans.LANES) or tuple(st.offsets.shape) != (nb,):
        raise HQFormatError(f"rANS stream of {st.n} symbols needs {nb} blocks of states and offsets")
    offs = st.offsets.to(torch.int64)
    ends = torch.cat([offs[1:], torch.tensor([st.words.numel()], dtype=torch.int64, device=dev)])
    if nb and (int(offs[0]) != 0 or bool((ends < offs).any())):
        raise HQFormatError("rANS block offsets are not increasing from 0")
    ctx = torch.from_numpy(rans.contexts(num_ctx) * m).to(device=dev, dtype=torch.int64)
    out = torch.empty(st.n, dtype=torch.int32, device=dev)
    fin = torch.empty(nb, rans.LANES + 1, dtype=torch.int64, device=dev)
    words = st.words.to(torch.int32) if st.words.numel() else torch.zeros(1, dtype=torch.int32, device=dev)
    if nb:
        _rans_decode_kernel[(nb,)](st.states.to(torch.int64).contiguous(), offs, ends, words, fq, dq, lut, ctx,
                                   out, fin, st.n, st.block, PREC=st.prec, K=rans.LANES)
    if bool((fin[:, : rans.LANES] != rans.STATE_LOW).any()) or bool((fin[:, rans.LANES] != ends).any()):
        raise HQFormatError("rANS stream is corrupt: a block does not end in its initial state with its words "
                            "used up")
    return rans.apply_escapes_torch(out, t, st.escapes)


def decode_launch(q, out: str = "codes", out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """See :func:`hq_diffusion.codec.ops_ref.decode_ref`, for a rANS-coded ``q``: ``q.codes_shape`` codes, or
    ``p(Y)/α·scale`` in ``out_dtype``."""
    if out not in ("codes", "rotated"):
        raise ValueError(f"out must be 'codes' or 'rotated', got {out!r}")
    if q.coder != "rans":
        raise ValueError(f"rans_decode takes rANS-coded tensors, got coder {q.coder!r}")
    syms = [symbols_launch(s, rans_contexts(q.lattice, i)) for i, s in enumerate(q.streams)]
    y = decode_symbols(q, syms, out)
    return y if out == "codes" else y.to(out_dtype)
