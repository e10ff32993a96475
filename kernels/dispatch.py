"""Choose, per call, between the Triton kernels and their torch references (``codec.ops_ref``): the one place
that makes that choice. The public operations here have the signatures of their ``ops_ref`` twins and are
bundled as :data:`DISPATCHED`, the :class:`~hq_diffusion.codec.ops_ref.OpSet` that ``HQLinear`` composes for
``backend="kernel"`` (which matmul path, storage and fusion to use is decided there, in ``nn/linear.py``).

Policy (read at every call, no global state besides the environment):

- ``HQ_KERNELS=torch``: always the torch reference.
- ``HQ_KERNELS=triton``: the Triton kernels wherever they can run — CUDA tensors, or any tensors when
  ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, ≈ 500× slower than torch; for tests). Where they cannot
  run (no GPU, no interpreter, Triton missing) the reference is used and a ``RuntimeWarning`` says so: a
  kernel launch is never attempted without a GPU or the interpreter.
- unset or ``HQ_KERNELS=auto``: Triton for CUDA tensors (when Triton is installed), the torch reference
  otherwise. On a CPU the reference runs even when ``TRITON_INTERPRET=1`` — the interpreter is opt-in.

Kernel modules import Triton, so they are imported only when the Triton side is chosen. Triton fixes
"compiled or interpreted" when a ``@triton.jit`` function is defined, its own library included: the
interpreter is used only when ``TRITON_INTERPRET=1`` was set before Triton's first import
(:func:`interpreter_usable`).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

from hq_diffusion.codec import ops_ref
from hq_diffusion.codec.hashing import key_to_u32

from .loader import kernel_module

ENV = "HQ_KERNELS"
BACKENDS = ("auto", "triton", "torch")
_TRUE = ("1", "true", "yes", "on", "y")


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    """The value of ``HQ_KERNELS`` (``"auto"`` when unset). Raises ValueError for anything else."""
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {BACKENDS}, got {os.environ[ENV]!r}")
    return mode


def backend(*tensors: torch.Tensor | None) -> str:
    """``"triton"`` or ``"torch"`` for an operation on ``tensors`` (see the module docstring)."""
    mode = requested_backend()
    if mode == "torch":
        return "torch"
    ts = [t for t in tensors if t is not None]
    on_cuda = bool(ts) and all(t.is_cuda for t in ts)
    if mode == "auto":
        return "triton" if on_cuda and triton_installed() else "torch"
    if triton_installed() and (on_cuda or interpreter_usable()):
        return "triton"
    if not triton_installed():
        why = "Triton is not installed"
    elif _interpret_env():
        why = "TRITON_INTERPRET=1 was set after Triton was imported (set it before the first import)"
    else:
        why = "the tensors are not on a CUDA device and TRITON_INTERPRET is not set"
    warnings.warn(f"{ENV}=triton but {why}: using the torch reference", RuntimeWarning, stacklevel=3)
    return "torch"


def interpreter_usable() -> bool:
    """Whether Triton's CPU interpreter can run here: ``TRITON_INTERPRET=1`` and Triton either not imported
    yet or imported with it (Triton builds its own ``@jit`` library functions at import, compiled or
    interpreted, so the variable must be set before the first ``import triton`` of the process)."""
    if not (_interpret_env() and triton_installed()):
        return False
    tl = sys.modules.get("triton.language")
    return tl is None or type(tl.zeros).__name__ == "InterpretedFunction"


def _ops():
    from . import ops  # registers torch.ops.hq_diffusion.* on first use (ops imports .loader, not this module)

    return ops


# ---- public operations -------------------------------------------------------------------------------------


def rht(x: torch.Tensor, seed: int, key: int | str, tile: int) -> torch.Tensor:
    """Forward RHT along the last axis. x: (..., K) bf16/fp16/fp32, K a multiple of ``tile``; returns the same
    shape and dtype (float32 math). ≡ ``codec.rht(x, seed, key, tile).to(x.dtype)``."""
    if backend(x) == "triton":
        return _ops().rht_op(x, int(seed), key_to_u32(key), int(tile))
    return ops_ref.rht_ref(x, seed, key, tile)


def rht_quant_int8(x: torch.Tensor, seed: int, key: int | str, tile: int, n_pad: int,
                   gain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate activations x (M, n) and quantize per token: (int8 (M, n_pad), float32 (M,) scales).
    ≡ :func:`hq_diffusion.codec.ops_ref.rht_quant_int8_ref`."""
    if backend(x, gain) == "triton":
        return _ops().rht_quant_int8_op(x, int(seed), key_to_u32(key), int(tile), int(n_pad), gain)
    return ops_ref.rht_quant_int8_ref(x, seed, key, tile, n_pad, gain)


def int8_gemm_dequant(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                      bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(xq @ wqᵀ) · xs[:, None] · ws[None, :] + bias``: int8 (M, K), float32 (M,), int8 (N, K), float32 (N,),
    (N,) → (M, N) ``out_dtype``. ≡ :func:`hq_diffusion.codec.ops_ref.int8_gemm_dequant_ref`."""
    if backend(xq, xs, wq, ws, bias) == "triton":
        return _ops().int8_gemm_dequant_op(xq, xs, wq, ws, bias, out_dtype)
    return ops_ref.int8_gemm_dequant_ref(xq, xs, wq, ws, bias, out_dtype)


def decode(q, out: str = "codes", out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode an EncodedTensor in the rotated basis: ``"codes"`` (int8 lattice integers, ``q.codes_shape``)
    or ``"rotated"`` (``p(Y)/α·scale`` in ``out_dtype``). ≡ :func:`hq_diffusion.codec.ops_ref.decode_ref`."""
    if backend(q.scales) == "triton":
        if getattr(q, "coder", "rice") == "rans":
            return kernel_module("rans_decode").decode_launch(q, out, out_dtype)
        return kernel_module("rice_decode").decode_launch(q, out, out_dtype)
    return ops_ref.decode_ref(q, out, out_dtype)


def fused_decode_gemm(xq: torch.Tensor, xs: torch.Tensor, q, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode the int8 lattice integers of ``q`` (N, n) and multiply: (M, N) ``out_dtype``.
    ≡ :func:`hq_diffusion.codec.ops_ref.fused_decode_gemm_ref`. On the Triton side the fused kernel runs when
    :func:`hq_diffusion.kernels.fused.fused_supported` holds, else decode + the int8 GEMM."""
    if backend(xq, xs, q.scales, bias) == "triton":
        fused = kernel_module("fused")
        if getattr(q, "coder", "rice") == "rice" and fused.fused_supported(q, xq.shape[0]):  # rANS: decode + GEMM
            return fused.fused_decode_gemm_launch(xq, xs, q, bias, out_dtype)
        wq = decode(q, "codes").reshape(q.rows, q.n_pad)
        if wq.dtype != torch.int8:
            raise ValueError("the int8 GEMM needs lattice integers that fit int8 (q.fits_int8 is False)")
        return int8_gemm_dequant(xq, xs, wq, ops_ref.row_dequant_scale(q), bias, out_dtype)
    return ops_ref.fused_decode_gemm_ref(xq, xs, q, bias, out_dtype)


#: The dispatched operations as an :class:`~hq_diffusion.codec.ops_ref.OpSet` (``ops_ref.REFERENCE``'s twin).
DISPATCHED = ops_ref.OpSet("dispatch", rht, rht_quant_int8, int8_gemm_dequant, decode, fused_decode_gemm)
