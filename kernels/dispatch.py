"""Choose, per call, between the Triton kernels and their torch references (``codec.ops_ref``).

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

import importlib
import importlib.util
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from hq_diffusion.codec import ops_ref
from hq_diffusion.codec.hashing import key_to_u32
from hq_diffusion.codec.lattice import to_physical

ENV = "HQ_KERNELS"
BACKENDS = ("auto", "triton", "torch")
#: Token count up to which :func:`hq_linear` uses the fused decode + GEMM kernel (Rice storage, int8 mma).
FUSED_MAX_TOKENS = 16
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


def kernel_module(name: str):
    """The kernel module ``hq_diffusion.kernels.<name>`` (imports Triton)."""
    pkg = __name__.rsplit(".", 1)[0]
    mod = importlib.import_module(f"{pkg}.{name}")
    jit = sys.modules[f"{pkg}._jit"]
    if jit.interpreting() != jit.LOADED_INTERPRETED:
        raise RuntimeError(f"the kernels were loaded {'for' if jit.LOADED_INTERPRETED else 'without'} Triton's "
                           f"interpreter but TRITON_INTERPRET is now {'off' if jit.LOADED_INTERPRETED else 'on'}; "
                           f"set it once, before Triton is imported")
    return mod


def _ops():
    from . import ops  # registers torch.ops.hq_diffusion.* on first use

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
        return kernel_module("rice_decode").decode_launch(q, out, out_dtype)
    return ops_ref.decode_ref(q, out, out_dtype)


def fused_decode_gemm(xq: torch.Tensor, xs: torch.Tensor, q, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode the int8 lattice integers of ``q`` (N, n) and multiply: (M, N) ``out_dtype``.
    ≡ :func:`hq_diffusion.codec.ops_ref.fused_decode_gemm_ref`. On the Triton side the fused kernel runs when
    :func:`hq_diffusion.kernels.fused.fused_supported` holds, else decode + the int8 GEMM."""
    if backend(xq, xs, q.scales, bias) == "triton":
        fused = kernel_module("fused")
        if fused.fused_supported(q, xq.shape[0]):
            return fused.fused_decode_gemm_launch(xq, xs, q, bias, out_dtype)
        wq = decode(q, "codes").reshape(q.rows, q.n_pad)
        if wq.dtype != torch.int8:
            raise ValueError("the int8 GEMM needs lattice integers that fit int8 (q.fits_int8 is False)")
        return int8_gemm_dequant(xq, xs, wq, ops_ref.row_dequant_scale(q), bias, out_dtype)
    return ops_ref.fused_decode_gemm_ref(xq, xs, q, bias, out_dtype)


# ---- the quantized linear layer ----------------------------------------------------------------------------


def _resolve_mma(module, x: torch.Tensor) -> str:
    if hasattr(module, "resolved_mma"):
        mma = module.resolved_mma(x.device)
    else:
        mma = getattr(module, "mma", None) or "int8"
        if mma == "auto":
            mma = "int8" if x.is_cuda and module.encoded().fits_int8 else "bf16"
    if mma not in ("int8", "bf16"):
        raise NotImplementedError(f"hq_linear implements mma 'int8' and 'bf16', not {mma!r}: use the module's "
                                  f"native forward")
    return mma


def _rotated_from_codes(q, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p(Y) / α · scale`` (N, K) from stored lattice integers, float32 math (``codec.decode``'s), in ``dtype``."""
    w = to_physical(q.lattice, codes.reshape(q.rows, q.n_pad))
    return (w * ops_ref.row_dequant_scale(q).unsqueeze(1)).to(dtype)


def hq_linear(x: torch.Tensor, module) -> torch.Tensor:
    """``y = x Wᵀ + b`` for a quantized linear layer: x (..., in_features) → (..., out_features) in x.dtype,
    computing what ``module.forward_native(x)`` computes (``HQLinear``), with the dispatched kernels.

    Interface read from ``module``:

    - ``encoded()`` → :class:`~hq_diffusion.codec.EncodedTensor` of the 2-D weight (out_features, in_features)
      on x's device (its ``streams`` may be empty when ``codes`` is given);
    - ``bias`` → Tensor (out_features,) or None;
    - ``resolved_mma(device)`` → ``"int8"`` or ``"bf16"`` (or, without that method, ``mma`` with ``"auto"`` =
      int8 for CUDA activations when the integers fit int8, else bf16); any other path raises
      NotImplementedError (the caller keeps its native forward);
    - optional ``codes`` → Tensor (out_features, n_pad) of the lattice integers (storage ``"int8"``), int8 (or
      int16/int32 when they exceed ±127); when present it is used instead of decoding the streams.

    int8: rotate + per-token int8 quantization of x, then — Rice storage and ≤ FUSED_MAX_TOKENS tokens —
    the fused decode + GEMM (Triton side; decode + GEMM where its layout constraint fails), otherwise the int8
    codes (stored, or decoded) and the int8 GEMM with the dequantization epilogue. Lattice integers beyond int8
    raise :class:`~hq_diffusion.codec.HQFormatError`, as the native path does.
    bf16: the weight ``p(Y)/α·scale`` in x.dtype (decoded, or from ``codes``), rotated x, ``F.linear``.
    """
    from hq_diffusion.codec import HQFormatError

    q = module.encoded()
    bias = getattr(module, "bias", None)
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"input of shape {tuple(x.shape)} does not match the weight of shape {tuple(q.shape)}")
    out_features = q.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mma = _resolve_mma(module, x)
    codes = getattr(module, "codes", None)
    if mma == "bf16":
        if codes is not None:
            w = _rotated_from_codes(q, codes, x.dtype)
        else:
            w = decode(q, "rotated", out_dtype=x.dtype).reshape(out_features, q.n_pad)
        xr = rht(F.pad(x2, (0, q.n_pad - x2.shape[1])), q.seed, q.key, q.tile)
        y = F.linear(xr, w, None if bias is None else bias.to(x.dtype))
        return y.reshape(*lead, out_features)
    if (codes is not None and codes.dtype != torch.int8) or (codes is None and not q.fits_int8):
        raise HQFormatError("lattice integers exceed int8; the int8 path cannot run (use mma='bf16')")
    xq, xs = rht_quant_int8(x2, q.seed, q.key, q.tile, q.n_pad, ops_ref.int8_operand_gain(q))
    ws = ops_ref.row_dequant_scale(q)
    if codes is not None:
        y = int8_gemm_dequant(xq, xs, codes.reshape(out_features, q.n_pad), ws, bias, x.dtype)
    elif x2.shape[0] <= FUSED_MAX_TOKENS:
        y = fused_decode_gemm(xq, xs, q, bias, x.dtype)
    else:
        y = int8_gemm_dequant(xq, xs, decode(q, "codes").reshape(out_features, q.n_pad), ws, bias, x.dtype)
    return y.reshape(*lead, out_features)
