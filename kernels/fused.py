"""Fused Rice decode + int8 GEMM for the small-token regime: the int8 weight tiles are rebuilt in registers
and fed to ``tl.dot``; the decoded weight is never written out.

Legend: M tokens (≤ 64; the dispatcher uses this path for ≤ 16), N output features (weight rows), K = n_pad,
BN weight rows per program step, BK the K step, D the lattice dimension, B the Rice block size.

Design: a program owns BN consecutive weight rows at a time (persistent grid over the ⌈N / BN⌉ row groups).
It runs the decode kernel's phase 1 on those rows (their unary bits are one contiguous range that starts at
a stored block offset, see the constraint below) into its private uint8 quotient scratch
(P × BN·K bytes with P ≤ one program per SM: meant to stay in L2, though for K = 16384 it is ≈ 34 MB and
may partly spill), then walks K in steps of BK: each step rebuilds the (BN, BK) int8 tile of
lattice integers in registers — quotients from scratch, remainders from the remainder stream, un-stripping
as in :mod:`.rice_decode` — and feeds it straight to ``tl.dot`` against the (BM, BK) int8 activation tile
with an int32 accumulator. The epilogue is the int8 GEMM's: ``(acc · xs[m]) · (scale/α)[n] + bias[n]``.

Constraint (checked by :func:`fused_supported`): a row group must begin at a Rice block boundary in every
stream, i.e. ``D_s · (BN · K / D)`` must be a multiple of B for each stream s (D_s symbols per vector), with
BN a power of two in [16, 128] (``tl.dot`` needs BN ≥ 16; larger groups would make the per-program scratch
and the tail too large). Rows may span several blocks, or blocks several rows: both work. For
K = 2^a · odd this needs BN = 2^max(4, log2(B) + c − a) with c = 0 for E8 and Z, 1 for A2, 2 for D4 — with
the default B = 4096: a ≥ 5 (E8, Z), a ≥ 6 (A2), a ≥ 7 (D4), which every LTX / LTX-2 linear satisfies
(K ∈ {128, 256, 2048, 3840, 4096, 8192, 16384}). Otherwise :func:`fused_decode_gemm_launch` raises
``ValueError`` and the dispatcher decodes, then runs the int8 GEMM. The weight's lattice integers must
fit int8 (``q.fits_int8``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hq_diffusion.codec.ops_ref import row_dequant_scale
from hq_diffusion.codec.rice import ESC

from ._jit import cast_out, interpreting, max_programs
from .rice_decode import (LATTICE_CODES, LAYOUT, group_aligned, group_plan, interpreter_chunk_bytes,
                          lattice_points, program_scratch, scan_group, stream_args)

MAX_TOKENS = 64
MAX_BN = 128


@triton.jit
def _fused_decode_gemm_kernel(
    x_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr,
    ks0, rbs0, bit0, un0, rem0, esc0, eb0, nrem0, nesc0,
    ks1, rbs1, bit1, un1, rem1, esc1, eb1, nrem1, nesc1,
    qscr, xscr,
    M, N, K, stride_xm, stride_om, nv, vg, num_groups,
    LAT: tl.constexpr, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, NS: tl.constexpr, B: tl.constexpr,
    HAS_ESC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, CBY: tl.constexpr, ESC: tl.constexpr,
):
    """out (M, N) = dequant(x (M, K) int8 @ decode(q) (N, K)ᵀ); one row group of BN rows per step."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    qrow, xrow = program_scratch(qscr, xscr, vg, D0, D1, HAS_ESC)
    VT: tl.constexpr = BN * BK // D  # vectors in a (BN, BK) tile
    KV: tl.constexpr = BK // D
    c = tl.arange(0, D)[None, :]
    tv = tl.arange(0, VT)[:, None]
    r = tv // KV
    kv = tv % KV
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    for g in range(pid, num_groups, nprog):
        scan_group(g, vg, nv, qrow, xrow, qscr, num_groups,
                   ks0, bit0, un0, esc0, eb0, nesc0, ks1, bit1, un1, esc1, eb1, nesc1,
                   D0, D1, NS, B, False, HAS_ESC, CBY, ESC)
        tl.debug_barrier()  # phase-1 scratch writes → visible to the whole program
        row0 = g * BN
        v0 = g * vg
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            col = k0 + kv * D
            v = ((row0 + r) * K + col) // D
            vmask = (row0 + r < N) & (col < K)
            y = lattice_points(v, c, vmask, v0, qrow, qrow + D0 * vg, xrow, xrow + D0 * vg,
                               ks0, rbs0, rem0, nrem0, ks1, rbs1, rem1, nrem1, LAT, D, B, HAS_ESC, ESC)
            w = tl.reshape(tl.where(vmask & (c < D), y, 0).to(tl.int8), (BN, BK))
            a = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                        mask=(rm[:, None] < M) & ((k0 + rk) < K)[None, :], other=0)
            acc = tl.dot(a, tl.trans(w), acc)
        rn = row0 + tl.arange(0, BN)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        out = (acc.to(tl.float32) * xs[:, None]) * ws[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], cast_out(out, out_ptr),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
        tl.debug_barrier()  # scratch reads done before the next group overwrites it


def fused_rows(q) -> int | None:
    """BN for ``q`` (the smallest power of two ≥ 16 whose row groups start at block boundaries), or None."""
    if q.lattice not in LAYOUT or len(q.shape) != 2:
        return None
    dim = LAYOUT[q.lattice][0]
    bn = 16
    while bn <= MAX_BN:
        if group_aligned(q.lattice, q.block, bn * q.n_pad // dim):
            return bn
        bn *= 2
    return None


def fused_supported(q, tokens: int) -> bool:
    """Whether :func:`fused_decode_gemm_launch` handles ``q`` for ``tokens`` tokens (see the module notes)."""
    return q.fits_int8 and 1 <= tokens <= MAX_TOKENS and fused_rows(q) is not None


def fused_decode_gemm_launch(xq: torch.Tensor, xs: torch.Tensor, q, bias: torch.Tensor | None = None,
                             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """See :func:`hq_diffusion.codec.ops_ref.fused_decode_gemm_ref`: xq int8 (M, K), xs float32 (M,), q the
    encoded (N, n) weight with K = q.n_pad, bias (N,) or None → (M, N) ``out_dtype``."""
    if xq.dtype != torch.int8 or xq.dim() != 2 or xq.shape[1] != q.n_pad:
        raise ValueError(f"xq must be int8 (M, {q.n_pad}), got {xq.dtype} {tuple(xq.shape)}")
    M = xq.shape[0]
    if xs.shape != (M,):
        raise ValueError(f"xs must have shape ({M},), got {tuple(xs.shape)}")
    if not fused_supported(q, M):
        raise ValueError(f"fused decode+GEMM does not handle this layout ({q.lattice}, shape {q.shape}, block "
                         f"{q.block}, fits_int8 {q.fits_int8}) with {M} tokens; decode, then use the int8 GEMM")
    N, K = q.rows, q.n_pad
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    dim = LAYOUT[q.lattice][0]
    bn = fused_rows(q)
    if interpreting():
        bn = max(bn, min(64, triton.next_power_of_2(N)))  # fewer, larger steps
    # both are powers of two, so the larger is a multiple of fused_rows(q): still block-aligned
    vg = bn * K // dim
    plan = group_plan(q, vg)
    has_esc = plan.ebase is not None
    nprog = min(plan.num_groups, max_programs(xq.device, per_sm=1))  # scratch P·BN·K bytes stays L2-sized
    sa = stream_args(plan, nprog, has_esc)
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    ws = row_dequant_scale(q).contiguous()
    xq = xq if xq.stride(1) == 1 else xq.contiguous()
    xs = xs.to(torch.float32).contiguous()
    if interpreting():
        cby, bk = interpreter_chunk_bytes(plan), min(512, max(16, triton.next_power_of_2(K)))
    else:
        cby, bk = 128, 128
    _fused_decode_gemm_kernel[(nprog,)](
        xq, xs, ws, bias.contiguous() if bias is not None else ws, out, *sa.streams, sa.qscr, sa.xscr,
        M, N, K, xq.stride(0), out.stride(0), plan.nv, vg, plan.num_groups,
        LAT=LATTICE_CODES[q.lattice], D=dim, B=q.block, HAS_ESC=has_esc, HAS_BIAS=bias is not None,
        BM=max(16, triton.next_power_of_2(M)), BN=bn, BK=bk, CBY=cby, ESC=ESC, **sa.meta,
        enable_fp_fusion=False)  # the reference's roundings in the epilogue (see int8_gemm), bit for bit
    return out
