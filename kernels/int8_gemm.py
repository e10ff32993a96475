"""int8 × int8 → int32 GEMM with a fused dequantization epilogue.

Legend: M tokens, N output features (weight rows), K = n_pad the contraction length.

``out[m, n] = (acc[m, n] · xs[m]) · ws[n] + bias[n]`` with ``acc = xq @ wqᵀ`` accumulated exactly in int32
(|acc| ≤ 127² · K < 2³¹ for K < 133 000), the epilogue in float32 with multiply-add contraction switched
off (``enable_fp_fusion=False``: an FMA would round once where the reference rounds twice), one rounding
to the output dtype — so the result equals the torch reference bit for bit on the GPU too.
Tiles are grouped along M for L2 reuse (Triton tutorial 03 ordering); ragged M, N and K are masked. On CUDA
the tile sizes are autotuned (key M, N, K); ``torch._int_mm`` followed by the same epilogue in torch is the
alternative the benchmark compares against (:func:`int8_gemm_dequant_int_mm`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hq_diffusion.codec.ops_ref import int8_gemm_dequant_ref, int_mm_supported

from ._jit import cast_out, interpreting

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, xs_ptr, ws_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = dequant(A (M, K) int8 @ B (N, K) int8ᵀ); A and B row-major (unit stride along K)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn[None, :] * stride_bn + rk[:, None]  # (BK, BN) view of B's rows
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, K, BK):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0)
        b = tl.load(b_ptrs, mask=(rn[None, :] < N) & kmask[:, None], other=0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK
        b_ptrs += BK
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    out = (acc.to(tl.float32) * xs[:, None]) * ws[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], cast_out(out, c_ptr), mask=cmask)


def _cuda_configs():
    cfgs = []
    for bm, bn, bk, w, s in [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 4, 4),
                             (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                             (64, 64, 128, 4, 4), (32, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4)]:
        cfgs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s))
    return cfgs


def select_configs(configs, m: int, arch: int | None):
    """The configurations worth trying for ``m`` tokens on ``sm_<arch>`` (None: unknown).

    Tiles taller than the token count are wasted. Before Hopper (no wgmma) a tile holding more than 64 int32
    accumulators per thread spills registers (``hq-diffusion bench kernels --compile-only --arch 80``: 560–650
    bytes per thread for the 128×128 and larger tiles), so those are left out there."""
    keep = [c for c in configs if c.kwargs["BM"] <= max(16, triton.next_power_of_2(m))]
    if arch is not None and arch < 90:
        keep = [c for c in keep if c.kwargs["BM"] * c.kwargs["BN"] <= 64 * 32 * c.num_warps]
    return keep or configs[-2:]


def _prune(configs, named_args, **kwargs):
    dev = named_args["a_ptr"].device
    arch = None
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        arch = 10 * major + minor
    return select_configs(configs, named_args["M"], arch)


_int8_gemm_tuned = triton.autotune(configs=_cuda_configs(), key=["M", "N", "K"],
                                   prune_configs_by={"early_config_prune": _prune})(_int8_gemm_kernel)
#: How the ahead-of-time check (:mod:`.aot`) learns which configurations the autotuner tries on an architecture.
_int8_gemm_tuned.select_for_arch = lambda named_args, arch: select_configs(_cuda_configs(), named_args["M"], arch)


def _check(xq, xs, wq, ws, bias, out_dtype):
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise ValueError(f"xq and wq must be int8, got {xq.dtype} and {wq.dtype}")
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"need xq (M, K) and wq (N, K) with the same K, got {tuple(xq.shape)} and {tuple(wq.shape)}")
    M, N = xq.shape[0], wq.shape[0]
    if xs.shape != (M,) or ws.shape != (N,):
        raise ValueError(f"need xs ({M},) and ws ({N},), got {tuple(xs.shape)} and {tuple(ws.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if xq.shape[1] >= 2**31 // (127 * 127):
        raise ValueError(f"K = {xq.shape[1]} could overflow the int32 accumulator")


def int8_gemm_dequant_launch(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """See :func:`hq_diffusion.codec.ops_ref.int8_gemm_dequant_ref`: xq int8 (M, K), xs float32 (M,),
    wq int8 (N, K), ws float32 (N,), bias (N,) or None → (M, N) ``out_dtype``."""
    _check(xq, xs, wq, ws, bias, out_dtype)
    xq = xq if xq.stride(1) == 1 else xq.contiguous()
    wq = wq if wq.stride(1) == 1 else wq.contiguous()
    M, K = xq.shape
    N = wq.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0 or N == 0:
        return c
    xs = xs.to(torch.float32).contiguous()
    ws = ws.to(torch.float32).contiguous()
    b = bias.contiguous() if bias is not None else ws
    args = (xq, wq, xs, ws, b, c, M, N, K, xq.stride(0), wq.stride(0), c.stride(0))
    if interpreting():
        bm = min(64, max(16, triton.next_power_of_2(M)))
        bn = min(128, max(16, triton.next_power_of_2(N)))
        bk = min(512, max(16, triton.next_power_of_2(K)))
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _int8_gemm_kernel[grid](*args, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, GROUP_M=8)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
        # no multiply-add contraction in the epilogue: the same roundings as the reference, bit for bit
        _int8_gemm_tuned[grid](*args, HAS_BIAS=bias is not None, enable_fp_fusion=False)
    return c


def int8_gemm_dequant_int_mm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The same operation with ``torch._int_mm`` (cuBLASLt int8) and the epilogue in torch (float32): the torch
    reference, which accumulates with ``torch._int_mm`` wherever :func:`int_mm_supported` holds. Raises
    ValueError for sizes or a device ``torch._int_mm`` does not accept."""
    _check(xq, xs, wq, ws, bias, out_dtype)
    if not int_mm_supported(xq.shape[0], wq.shape[0], xq.shape[1], xq.device):
        raise ValueError(f"torch._int_mm does not accept ({xq.shape[0]}, {xq.shape[1]}) × ({wq.shape[0]}, "
                         f"{wq.shape[1]})ᵀ on {xq.device}: it needs CUDA, M > 16, K and N multiples of 8")
    return int8_gemm_dequant_ref(xq, xs, wq, ws, bias, out_dtype)
