"""The CPU forward of the ``"bf16"`` matmul path: multiply by the lattice integers, scale in the epilogue.

Legend: M tokens, K = K_pad the padded contraction length, N output features.

The generic ``"bf16"`` path decodes the weight through int32 lattice integers to ``W_rot = p(Y) / α · scale``
(N, K) float32 and casts it to the activation dtype: five passes over N·K values after the Rice decode.
On the CPU, where those passes cost more than the matmul, this path decodes an E8 Rice or rANS stream straight to
int8 integers ``Y`` (SWAR unstrip, no int32 array) and keeps them as integers until the matmul:

    out = (rht(x) ⊙ g) @ Yᵀ · (scale / α) + bias

with ``g`` the per-column gain of :func:`~hq_diffusion.codec.ops_ref.int8_operand_gain` (√3 on the first axis
of every A2 pair, else none) and the per-row ``scale / α`` applied in float32 to the (M, N) output. ``Y`` is
exact in bf16/fp32, so no weight is rounded (the generic path rounds every ``p(Y) · scale / α`` to bf16):
the outputs differ from the generic path's by output-rounding only. :data:`ENABLED` switches the path off
(e.g. to reproduce a forward recorded with the generic path bit for bit).

Decoding once per denoising step (:func:`cached_codes`): inside the ``with`` block every Rice-stored
:class:`~hq_diffusion.nn.linear.HQLinear` under a module decodes its integers at its first forward and keeps
them as int8 (N, K) — 8 bits per weight of extra memory for the block's duration, about twice the Rice
stream at 4 bps — and drops them when the block exits. No float copy of a weight is ever kept.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..codec.errors import HQFormatError
from ..codec.ops_ref import OpSet, int8_operand_gain, row_dequant_scale
from ..codec.rht import pad_last
from ..codec import rans
from ..codec.format import rans_contexts
from ..codec.rans import RansStream
from ..codec.rice import RiceStream, decode_stream
from ..codec.strip import unstrip_e8_int8
from ..kernels import dispatch

#: Whether the ``"bf16"`` path of a layer on the CPU takes :func:`mma_codes_cpu` (see the module docstring).
ENABLED = True
_CACHE_ATTR = "_hq_cached_codes"  # None: caching on, nothing decoded yet; a tensor: the cached int8 codes


def codes_path_applies(m, x: torch.Tensor, ops: OpSet) -> bool:
    """Whether :func:`mma_codes_cpu` runs for layer ``m``, activations ``x`` (M, K) and op set ``ops`` (either
    backend: the path composes ``ops`` too): unless ``HQ_KERNELS=triton`` asks for the kernels, with
    lattice integers that fit int8 (stored ``codes`` of dtype int8, or Rice streams flagged ``fits_int8``)
    and bf16/fp32 activations (float16 keeps the generic path and its overflow guard), outside
    ``torch.compile`` tracing."""
    if not ENABLED or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or torch.compiler.is_compiling():
        return False
    if dispatch.requested_backend() == "triton":
        return False  # kernels asked for (Triton's CPU interpreter): the generic path runs them
    codes = getattr(m, "codes", None)
    return codes.dtype == torch.int8 if codes is not None else bool(m.encoded().fits_int8)


def decode_int8(q, ops: OpSet) -> torch.Tensor:
    """int8 (N, K) lattice integers of a CPU tensor ``q`` whose integers fit int8.

    An E8 Rice or rANS stream decodes to symbols (rANS: the compiled coder of ``codec/rans_jit.py``) and goes
    straight to int8 (:func:`~hq_diffusion.codec.strip.
    unstrip_e8_int8`, a quarter of the memory traffic of the int32 unstrip); any other lattice or coder
    goes through ``ops.decode(q, "codes")``. Both give the same integers; a symbol beyond 127 (a stream
    that contradicts its ``fits_int8`` flag) raises :class:`~hq_diffusion.codec.HQFormatError`."""
    if q.lattice == "e8" and len(q.streams) == 1 and isinstance(q.streams[0], (RiceStream, RansStream)):
        st = q.streams[0]  # Rice, or rANS through the compiled coder (E8's two contexts)
        syms = decode_stream(st) if isinstance(st, RiceStream) else rans.decode_stream(st, rans_contexts("e8", 0))
        try:
            return unstrip_e8_int8(syms).reshape(q.rows, q.n_pad)
        except ValueError as e:
            raise HQFormatError(f"codes flagged as int8 but out of range: {e}") from None
    return ops.decode(q, "codes").reshape(q.rows, q.n_pad)


def _int8_codes(m, q, ops: OpSet) -> torch.Tensor:
    """int8 (N, K) lattice integers: the stored ``codes``, the ones cached by :func:`cached_codes`, or
    decoded now (:func:`decode_int8`)."""
    codes = getattr(m, "codes", None)
    if codes is not None:
        return codes.reshape(q.rows, q.n_pad)
    if hasattr(m, _CACHE_ATTR):
        cached = getattr(m, _CACHE_ATTR)
        if cached is None:
            cached = decode_int8(q, ops)
            setattr(m, _CACHE_ATTR, cached)
        return cached
    return decode_int8(q, ops)


def mma_codes_cpu(m, x: torch.Tensor, ops: OpSet) -> torch.Tensor:
    """``x Wᵀ + b`` for x (M, K_in) bf16/fp32 on the CPU → (M, N) in x.dtype (see the module docstring).

    The matmul runs in x.dtype with the integers exact in it; the output is rescaled in float32."""
    q, dt = m.encoded(), x.dtype
    ws = row_dequant_scale(q)  # float32 (N,)
    if not bool(torch.isfinite(ws).all()):
        raise HQFormatError(f"{getattr(m, 'name', '') or 'HQLinear'}: row scales / alpha are not finite "
                            f"(corrupt or crafted data)")
    xr = ops.rht(pad_last(x, q.n_pad), q.seed, q.key, q.tile)  # (M, K) in dt, float32 math
    gain = int8_operand_gain(q)
    if gain is not None:
        xr = (xr.to(torch.float32) * gain).to(dt)
    out = F.linear(xr, _int8_codes(m, q, ops).to(dt)).to(torch.float32) * ws  # |Y| ≤ 127: exact in dt
    if m.bias is not None:
        out = out + m.bias.to(torch.float32)
    return out.to(dt)


@contextlib.contextmanager
def cached_codes(module: nn.Module) -> Iterator[int]:
    """Decode each stream-stored (Rice or rANS) ``HQLinear`` under ``module`` (itself included) once for the ``with`` block.

    Use it around one denoising step (or any run of forwards with the same weights): a layer called several
    times inside (classifier-free guidance halves, repeated blocks) decodes its streams at its first CPU
    forward only, keeps int8 (N, K_pad) codes and frees them at exit, also when the block raises. Yields the
    number of layers it covers. Nesting the same module is an error (ValueError), since the inner exit
    would free the outer block's codes."""
    layers = [mod for mod in module.modules() if getattr(mod, "storage", None) in ("rice", "rans") and hasattr(mod, "encoded")]
    if any(hasattr(mod, _CACHE_ATTR) for mod in layers):
        raise ValueError("cached_codes: some layers are already inside a cached_codes block")
    for mod in layers:
        setattr(mod, _CACHE_ATTR, None)
    try:
        yield len(layers)
    finally:
        for mod in layers:
            delattr(mod, _CACHE_ATTR)


def cached_bytes(module: nn.Module) -> int:
    """Bytes of int8 codes currently cached by :func:`cached_codes` under ``module``."""
    total = 0
    for mod in module.modules():
        t = getattr(mod, _CACHE_ATTR, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total
