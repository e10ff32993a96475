"""Randomized Hadamard transform of activations, alone or fused with per-token int8 quantization.

Legend: M tokens (rows), n the activation length, K = n_pad the padded contraction length (a multiple of the
tile H), BO output columns per program step.

Design: the FWHT of a tile is a matmul with the ±1 Sylvester matrix, so a program multiplies its
(BM, SUB) input sub-tile, after the sign flip, by a (SUB, BO) slice of the Hadamard matrix with ``tl.dot``
(bf16/fp16 operands — exact, since ``x ⊙ d`` is still a bf16/fp16 value — and float32 accumulation; float32
inputs use an IEEE float32 dot). Tiles up to 256 use one sub-tile (``SUB = max(H, 16)``; tiles of 8 use a
block-diagonal 16×16 matrix because ``tl.dot`` needs K ≥ 16). Larger tiles are ``H_a ⊗ H_256``: output
sub-tile j is ``Σ_i (−1)^{popcount(i & j)} · x_i H_256``. Signs are regenerated in the kernel from
``(seed, key, column)`` with the lowbias32 hash, so nothing but the activations is read.

``rht_quant_int8`` runs one program per BM tokens over the whole row twice: pass 1 takes the per-token
absmax of the rotated (and gained) values, pass 2 recomputes them and writes ``round(y / s)`` as int8. The
recomputation costs a second read of the bf16 activations instead of a float32 round trip through memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hq_diffusion.codec.hashing import stream_base
from hq_diffusion.codec.rht import ALLOWED_TILES

from ._jit import cast_out, hadamard, interpreting, rht_signs, round_half_even

_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rht_block(x_ptr, stride_xm, rows, rmask, n, c0, base, inv_sqrt, h_ptr,
               A: tl.constexpr, SUB: tl.constexpr, KC: tl.constexpr, BO: tl.constexpr, BM: tl.constexpr,
               IS_F32: tl.constexpr):
    """Rotated values of output columns ``[c0, c0 + BO)`` for the rows ``rows``: float32 (BM, BO).

    x: (M, n) row-major with row stride ``stride_xm``; columns ≥ n read as zero (the padding).
    h_ptr: (SUB, SUB) Hadamard matrix (block-diagonal for H < SUB) in the dtype of x. A = H / SUB sub-tiles
    per tile (1 when H ≤ 256). Each sub-tile product runs over its SUB inputs in chunks of KC (KC = SUB for
    tensor-core operands; float32 operands use small chunks so the non-tensor-core dot fits in registers)."""
    TS: tl.constexpr = SUB * A  # columns of one (super-)tile
    t0 = (c0 // TS) * TS
    j = (c0 % TS) // SUB
    o = c0 % SUB
    r_kc = tl.arange(0, KC)
    oc = o + tl.arange(0, BO)
    HOIST: tl.constexpr = A > 1 and KC == SUB  # one chunk, several sub-tiles: load the H slice once
    if HOIST:
        h_all = tl.load(h_ptr + r_kc[:, None] * SUB + oc[None, :])  # (SUB, BO)
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    for i in tl.static_range(A):
        part = tl.zeros((BM, BO), dtype=tl.float32)
        for kk in range(SUB // KC):
            r = kk * KC + r_kc
            cols = t0 + i * SUB + r
            xv = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                         mask=rmask[:, None] & (cols[None, :] < n), other=0.0)
            if HOIST:
                hm = h_all
            else:
                hm = tl.load(h_ptr + r[:, None] * SUB + oc[None, :])  # (KC, BO)
            d = rht_signs(cols, base)
            xd = (xv.to(tl.float32) * d[None, :]).to(xv.dtype)  # a sign flip: exact in any float dtype
            if IS_F32:
                part = tl.dot(xd.to(tl.float32), hm.to(tl.float32), part, input_precision="ieee")
            else:
                part = tl.dot(xd, hm, part)
        if A > 1:
            p = i & j
            p = (p ^ (p >> 1) ^ (p >> 2)) & 1  # parity of i & j (A ≤ 8)
            part = tl.where(p == 1, -part, part)
        acc += part
    return acc * inv_sqrt


@triton.jit
def _rht_kernel(x_ptr, y_ptr, h_ptr,
                M, n, K, stride_xm, stride_ym, base, inv_sqrt,
                A: tl.constexpr, SUB: tl.constexpr, KC: tl.constexpr, BO: tl.constexpr, BM: tl.constexpr,
                IS_F32: tl.constexpr):
    """y (M, K) = RHT(pad(x)) in the dtype of y; grid (cdiv(M, BM), cdiv(K, BO))."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    c0 = tl.program_id(1) * BO
    y = _rht_block(x_ptr, stride_xm, rows, rmask, n, c0, base, inv_sqrt, h_ptr, A, SUB, KC, BO, BM, IS_F32)
    cols = c0 + tl.arange(0, BO)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], cast_out(y, y_ptr),
             mask=rmask[:, None] & (cols[None, :] < K))


@triton.jit
def _rht_quant_kernel(x_ptr, q_ptr, s_ptr, g_ptr, h_ptr,
                      M, n, K, stride_xm, base, inv_sqrt,
                      A: tl.constexpr, SUB: tl.constexpr, KC: tl.constexpr, BO: tl.constexpr, BM: tl.constexpr,
                      IS_F32: tl.constexpr, HAS_GAIN: tl.constexpr):
    """q int8 (M, K) = round(RHT(pad(x)) · gain / s), s float32 (M,) = absmax / 127; grid (cdiv(M, BM),)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    amax = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, K, BO):
        y = _rht_block(x_ptr, stride_xm, rows, rmask, n, c0, base, inv_sqrt, h_ptr, A, SUB, KC, BO, BM, IS_F32)
        cols = c0 + tl.arange(0, BO)
        if HAS_GAIN:
            y = y * tl.load(g_ptr + cols, mask=cols < K, other=0.0)[None, :]
        y = tl.where(cols[None, :] < K, y, 0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
    s = tl.where(amax > 0, tl.math.div_rn(amax, tl.full((BM,), 127.0, tl.float32)), 1.0)
    tl.store(s_ptr + rows, s, mask=rmask)
    for c0 in range(0, K, BO):
        y = _rht_block(x_ptr, stride_xm, rows, rmask, n, c0, base, inv_sqrt, h_ptr, A, SUB, KC, BO, BM, IS_F32)
        cols = c0 + tl.arange(0, BO)
        if HAS_GAIN:
            y = y * tl.load(g_ptr + cols, mask=cols < K, other=0.0)[None, :]
        v = round_half_even(tl.math.div_rn(y, s[:, None]))
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], v.to(tl.int8),
                 mask=rmask[:, None] & (cols[None, :] < K))


def _dot_f32(dtype: torch.dtype) -> bool:
    """Float32 dot operands: for float32 inputs, and in the interpreter, whose ``tl.dot`` multiplies the raw
    bits of bfloat16 operands (Triton 3.x). Same products either way: ``x ⊙ d`` and ±1 are exact."""
    return dtype == torch.float32 or interpreting()


@dataclass(frozen=True)
class _Geometry:
    """Launch geometry: SUB inputs per sub-tile, KC per dot, BO output columns and BM rows per program step,
    and the software-pipelining depth of the quantizing kernel's column loop."""

    sub: int
    kc: int
    bo: int
    bm: int
    stages: int


#: Shared memory the pipelined column loop of ``_rht_quant_kernel`` may use for its buffered loads
#: (fits an A100's 164 KiB per block as well as an H100's 227 KiB, with room for the dot operands).
_PIPELINE_BYTES = 96 * 1024


def _geometry(tile: int, dtype: torch.dtype, interp: bool | None = None) -> _Geometry:
    """Geometry for ``tile`` and activations of ``dtype``; ``interp`` (default: whether Triton interprets)
    picks the interpreter's few large steps instead of the GPU's register- and shared-memory-sized ones."""
    sub = max(16, min(tile, 256))
    if interpreting() if interp is None else interp:  # few, large steps: the interpreter pays per operation
        return _Geometry(sub, sub, sub, 64, 1)
    f32 = dtype == torch.float32
    kc = min(sub, 32) if f32 else sub  # float32 dots are not on tensor cores: keep operands in registers
    bo, bm = min(sub, 64), 32
    a = max(1, tile // sub)
    per_stage = (a * bm * kc + kc * bo) * (4 if f32 else 2)  # bytes loaded per column step
    stages = max(1, min(3, _PIPELINE_BYTES // per_stage))
    return _Geometry(sub, kc, bo, bm, stages)


def _check(x: torch.Tensor, tile: int, K: int):
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"activations must be bfloat16, float16 or float32, got {x.dtype}")
    if tile not in ALLOWED_TILES:
        raise ValueError(f"tile must be a power of two in [8, 2048], got {tile}")
    if K % tile:
        raise ValueError(f"padded length {K} is not a multiple of the tile {tile}")
    if x.shape[-1] > K:
        raise ValueError(f"activation length {x.shape[-1]} exceeds the padded length {K}")
    if x.numel() >= 2**31 or x.shape[:-1].numel() * K >= 2**31:
        raise ValueError(f"tensor too large for int32 indexing: {tuple(x.shape)}")


def rht_launch(x: torch.Tensor, seed: int, key: int | str, tile: int) -> torch.Tensor:
    """RHT of ``x`` (..., K) along the last axis; K a multiple of ``tile``. Returns ``x.dtype`` (..., K)."""
    K = x.shape[-1]
    _check(x, tile, K)
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    y = torch.empty_like(x2)
    if M == 0:
        return y.reshape(x.shape)
    geo = _geometry(tile, x.dtype)
    h = hadamard(geo.sub, min(tile, geo.sub), x.dtype, x.device)
    grid = (triton.cdiv(M, geo.bm), triton.cdiv(K, geo.bo))
    _rht_kernel[grid](x2, y, h, M, K, K, x2.stride(0), y.stride(0), stream_base(seed, key),
                      1.0 / math.sqrt(tile), A=max(1, tile // geo.sub), SUB=geo.sub, KC=geo.kc, BO=geo.bo,
                      BM=geo.bm, IS_F32=_dot_f32(x.dtype))
    return y.reshape(x.shape)


def rht_quant_int8_launch(x: torch.Tensor, seed: int, key: int | str, tile: int, n_pad: int,
                          gain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`hq_diffusion.codec.ops_ref.rht_quant_int8_ref`. x: (M, n); returns int8 (M, n_pad), float32 (M,)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, n), got shape {tuple(x.shape)}")
    _check(x, tile, n_pad)
    if gain is not None and (gain.shape != (n_pad,) or gain.dtype != torch.float32):
        raise ValueError(f"gain must be float32 ({n_pad},), got {gain.dtype} {tuple(gain.shape)}")
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    M, n = x2.shape
    q = torch.empty(M, n_pad, dtype=torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    geo = _geometry(tile, x.dtype)
    h = hadamard(geo.sub, min(tile, geo.sub), x.dtype, x.device)
    g = gain.contiguous() if gain is not None else s  # any pointer when unused
    _rht_quant_kernel[(triton.cdiv(M, geo.bm),)](
        x2, q, s, g, h, M, n, n_pad, x2.stride(0), stream_base(seed, key), 1.0 / math.sqrt(tile),
        A=max(1, tile // geo.sub), SUB=geo.sub, KC=geo.kc, BO=geo.bo, BM=geo.bm, IS_F32=_dot_f32(x.dtype),
        HAS_GAIN=gain is not None, num_stages=geo.stages)
    return q, s
