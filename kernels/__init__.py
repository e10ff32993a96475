"""Triton kernels of hq-diffusion (installed as ``hq_diffusion.kernels``), each the twin of a torch reference
in :mod:`hq_diffusion.codec.ops_ref`, chosen per call by :mod:`.dispatch` (Triton for CUDA tensors, the
reference on CPU; ``HQ_KERNELS=triton|torch|auto`` overrides; ``TRITON_INTERPRET=1`` runs Triton on CPU).

Importing this package does not import Triton.
"""
from .dispatch import (
    FUSED_MAX_TOKENS,
    backend,
    decode,
    fused_decode_gemm,
    hq_linear,
    int8_gemm_dequant,
    rht,
    rht_quant_int8,
)

__all__ = [
    "FUSED_MAX_TOKENS", "backend", "decode", "fused_decode_gemm", "hq_linear", "int8_gemm_dequant", "rht",
    "rht_quant_int8",
]
