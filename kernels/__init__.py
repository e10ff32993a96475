"""Triton kernels of hq-diffusion (installed as ``hq_diffusion.kernels``), each the twin of a torch reference
in :mod:`hq_diffusion.codec.ops_ref`, chosen per call by :mod:`.dispatch` (Triton for CUDA tensors, the
reference on CPU; ``HQ_KERNELS=triton|torch|auto`` overrides; ``TRITON_INTERPRET=1`` runs Triton on CPU).
:data:`DISPATCHED` bundles the dispatched operations as an :class:`~hq_diffusion.codec.ops_ref.OpSet`; the
quantized linear layer that composes them is ``hq_diffusion.nn.linear`` (``hq_linear``, ``HQLinear``).

Importing this package does not import Triton.
"""
from .dispatch import (
    DISPATCHED,
    backend,
    decode,
    fused_decode_gemm,
    int8_gemm_dequant,
    rht,
    rht_quant_int8,
)

__all__ = ["DISPATCHED", "backend", "decode", "fused_decode_gemm", "int8_gemm_dequant", "rht", "rht_quant_int8"]
