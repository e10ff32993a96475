"""Torch references of the matmul-side operations that the Triton kernels implement.

Legend: M tokens, K = n_pad (padded contraction length), N output features.

Each function here is the exact specification of a kernel in ``hq_diffusion.kernels`` with the same
signature; the kernels are tested against these. :data:`REFERENCE` bundles them as an :class:`OpSet`, the
interface ``hq_diffusion.nn.linear`` composes; ``hq_diffusion.kernels.DISPATCHED`` is the same set with a
per-call choice between these references and the Triton kernels (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .lattice import axis_gain
from .rht import pad_last, rht
from .scales import scale_values


def rht_quant_int8_ref(x: torch.Tensor, seed: int, key: int | str, tile: int, n_pad: int,
                       gain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate activations and quantize them per token to int8.

    Args:
        x: (M, n) float (bf16/fp16/fp32) activations; ``n ≤ n_pad``.
        seed, key, tile: the RHT of the weight they multiply (same signs, same tile).
        n_pad: padded contraction length K, a multiple of ``tile``.
        gain: optional float32 (K,) per-column factor applied after the rotation (√3 on the first axis of
            every A2 pair, so the lattice integers can be used as an integer matrix).
    Returns:
        xq: int8 (M, K), ``round(x_rot / s)`` clamped to ±127; xs: float32 (M,), ``s = max|x_rot| / 127``
        (1 for an all-zero token).
    """
    xr = rht(pad_last(x.to(torch.float32), n_pad), seed, key, tile)
    if gain is not None:
        xr = xr * gain
    amax = xr.abs().amax(-1)
    xs = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    xq = torch.round(xr / xs.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return xq, xs


def int_mm_supported(m: int, n: int, k: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` (int8 × int8 → int32) accepts an (m, k) × (k, n) product on ``device``
    (CUDA, m > 16, k and n multiples of 8)."""
    return device.type == "cuda" and hasattr(torch, "_int_mm") and m > 16 and k % 8 == 0 and n % 8 == 0


def exact_int_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``xq @ wqᵀ`` computed exactly: int (M, K) × int (N, K) → (M, N) int32 from ``torch._int_mm`` where it
    accepts the operands (int8 both, :func:`int_mm_supported`), else float64 (exact below 2**53, far above
    127·127·K for any K here). Both give the same integers, so the choice affects speed only."""
    (m, k), n = xq.shape, wq.shape[0]
    if xq.dtype == wq.dtype == torch.int8 and int_mm_supported(m, n, k, xq.device):
        return torch._int_mm(xq.contiguous(), wq.contiguous().t())
    return xq.to(torch.float64) @ wq.to(torch.float64).T


def int8_gemm_dequant_ref(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``out = (xq @ wqᵀ) · xs[:, None] · ws[None, :] + bias`` with an exact integer accumulation.

    Args:
        xq: int8 (M, K); xs: float32 (M,) token scales.
        wq: int8 (N, K) lattice integers; ws: float32 (N,) row scale / α.
        bias: optional (N,) any float dtype.
    Returns:
        (M, N) in ``out_dtype``. The int32 accumulator is computed exactly (:func:`exact_int_matmul`).
    """
    out = exact_int_matmul(xq, wq).to(torch.float32) * xs.to(torch.float32).unsqueeze(1) * ws.to(torch.float32).unsqueeze(0)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


# ---- references of the decode-side kernels ----------------------------------------------------------------


def rht_ref(x: torch.Tensor, seed: int, key: int | str, tile: int) -> torch.Tensor:
    """Forward RHT of ``x`` (..., K), K a multiple of ``tile``, in float32 math, returned in ``x.dtype``."""
    return rht(x, seed, key, tile).to(x.dtype)


def row_dequant_scale(q) -> torch.Tensor:
    """Per-row factor from lattice integers to the rotated weight: float32 (R,) ``scale / α``.

    Exactly the float32 arithmetic of :func:`hq_diffusion.codec.decode` (float32 scales / alpha; a log8 scale
    section is converted by :func:`~hq_diffusion.codec.scales.scale_values`)."""
    return scale_values(q.scales, q.scale_dtype) / q.alpha


def int8_operand_gain(q) -> torch.Tensor | None:
    """Per-column factor the activations need so the lattice integers work as an integer matrix:
    float32 (K,) (√3 on the first axis of every A2 pair), or None when all ones."""
    return axis_gain(q.lattice, q.n_pad, q.scales.device)


def decode_ref(q, out: str = "codes", out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode an :class:`EncodedTensor` in the rotated basis (the spec of ``kernels.decode``).

    Args:
        q: the encoded tensor; R rows, K = ``q.n_pad``.
        out: ``"codes"`` — the lattice integers, shape ``q.codes_shape``, int8 when ``q.fits_int8`` (else
            int16/int32, like :func:`~hq_diffusion.codec.decode`); ``"rotated"`` — ``p(Y) / α · scale`` computed
            in float32 and returned in ``out_dtype``.
    """
    from .core import decode

    if out not in ("codes", "rotated"):
        raise ValueError(f"out must be 'codes' or 'rotated', got {out!r}")
    y = decode(q, out=out)
    return y if out == "codes" else y.to(out_dtype)


def fused_decode_gemm_ref(xq: torch.Tensor, xs: torch.Tensor, q, bias: torch.Tensor | None = None,
                          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode-then-GEMM: ``int8_gemm_dequant_ref(xq, xs, codes(q), scale/α, bias)``.

    Args:
        xq: int8 (M, K) rotated, quantized activations (K = ``q.n_pad``); xs: float32 (M,) token scales.
        q: encoded 2-D weight (N, n) whose lattice integers fit int8.
    Returns:
        (M, N) in ``out_dtype``.
    """
    if not q.fits_int8:
        raise ValueError("the int8 GEMM needs lattice integers that fit int8 (q.fits_int8 is False)")
    wq = decode_ref(q, "codes").reshape(q.rows, q.n_pad)
    return int8_gemm_dequant_ref(xq, xs, wq, row_dequant_scale(q), bias, out_dtype)


@dataclass(frozen=True)
class OpSet:
    """The tensor-level operations a quantized linear layer is composed of, each with the signature of its
    ``*_ref`` function here. :data:`REFERENCE` is the torch set; ``hq_diffusion.kernels.DISPATCHED`` chooses
    per call between it and the Triton kernels. ``hq_diffusion.nn.linear`` composes either one the same way.
    """

    name: str
    rht: Callable[..., torch.Tensor]
    rht_quant_int8: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    int8_gemm_dequant: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    fused_decode_gemm: Callable[..., torch.Tensor]


#: The torch references, as an :class:`OpSet`.
REFERENCE = OpSet("torch", rht_ref, rht_quant_int8_ref, int8_gemm_dequant_ref, decode_ref, fused_decode_gemm_ref)
