"""``torch.library`` registrations of the Triton launchers (``torch.ops.hq_diffusion.*``), with fake
implementations so ``torch.compile`` can trace through them without running a kernel.

Registered: ``rht``, ``rht_quant_int8``, ``int8_gemm_dequant`` (tensor-only signatures). ``decode`` and
``fused_decode_gemm`` take an :class:`~hq_diffusion.codec.EncodedTensor` (a Python object holding a variable
number of streams) and are called directly: ``torch.compile`` graph-breaks there.

The op bodies look the kernel modules up through :func:`.loader.kernel_module` at call time, so
registering the ops does not import Triton.
"""
from __future__ import annotations

import torch

from .loader import kernel_module


@torch.library.custom_op("hq_diffusion::rht", mutates_args=())
def rht_op(x: torch.Tensor, seed: int, key: int, tile: int) -> torch.Tensor:
    """x (..., K) float, K % tile == 0 → RHT(x), same shape and dtype. ``key`` is the uint32 layer key."""
    return kernel_module("rotate").rht_launch(x, seed, key, tile)


@rht_op.register_fake
def _(x, seed, key, tile):
    return torch.empty_like(x)


@torch.library.custom_op("hq_diffusion::rht_quant_int8", mutates_args=())
def rht_quant_int8_op(x: torch.Tensor, seed: int, key: int, tile: int, n_pad: int,
                      gain: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, n) float → (int8 (M, n_pad), float32 (M,)); see ``ops_ref.rht_quant_int8_ref``."""
    return kernel_module("rotate").rht_quant_int8_launch(x, seed, key, tile, n_pad, gain)


@rht_quant_int8_op.register_fake
def _(x, seed, key, tile, n_pad, gain):
    m = x.shape[0]
    return x.new_empty((m, n_pad), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("hq_diffusion::int8_gemm_dequant", mutates_args=())
def int8_gemm_dequant_op(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """int8 (M, K) × int8 (N, K)ᵀ → (M, N) ``out_dtype``; see ``ops_ref.int8_gemm_dequant_ref``."""
    return kernel_module("int8_gemm").int8_gemm_dequant_launch(xq, xs, wq, ws, bias, out_dtype)


@int8_gemm_dequant_op.register_fake
def _(xq, xs, wq, ws, bias, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)
