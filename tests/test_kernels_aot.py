"""Every Triton kernel compiles for a real GPU (sm_90: H100/H200) and fits its limits — checked without a GPU.

The interpreter tests (``test_kernels.py``) check what the kernels compute; these check that Triton's real
compiler and ``ptxas`` accept the launches the package makes, that nothing spills registers, that shared
memory fits, and that the matrix products run on tensor cores with the intended operand types.
"""
from __future__ import annotations

import pytest
triton = pytest.importorskip("triton")

from hq_diffusion.kernels import _jit, aot  # noqa: E402

pytestmark = pytest.mark.skipif(_jit.LOADED_INTERPRETED, reason="kernels imported for the interpreter here")


def _compile(launches, arch):
    try:
        return [c for launch in launches for c in aot.compile_launch(launch, arch)]
    except aot.AOTUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def quick_launches():
    return aot.record_launches(full=False)


def test_recorded_launches_are_the_cuda_path(quick_launches):
    """The recorder sees the CUDA code path's launches: one per kernel, GPU tile sizes, every GEMM config."""
    by = {launch.kernel: launch for launch in quick_launches}
    assert set(by) == {"rice_decode", "rans_decode", "rht", "rht_quant", "int8_gemm", "fused_decode_gemm"}
    assert by["rice_decode"].kwargs["CBY"] == 128  # the GPU's chunk, not the interpreter's
    assert by["rht"].kwargs["BM"] == 32 and by["rht_quant"].kwargs["num_stages"] >= 1
    from hq_diffusion.kernels import int8_gemm

    assert len(by["int8_gemm"].configs) == len(int8_gemm._cuda_configs()) == 10  # none pruned at 4096 tokens
    assert by["fused_decode_gemm"].kwargs["BK"] == 128


def test_every_kernel_compiles_for_h100(quick_launches):
    res = _compile(quick_launches, 90)
    assert len(res) == 16  # 2 decode + 1 rANS decode + 2 RHT + 10 GEMM configs + 1 fused
    for c in res:
        assert c.ok, (c.kernel, c.variant, c.config, c.problem)
        assert c.local == 0, f"{c.kernel} {c.variant} {c.config} spills {c.local} bytes per thread"
        assert 0 < c.regs <= 255
    mma = {c.kernel: set(c.mma) for c in res}
    # int8 × int8 → int32 on tensor cores: Hopper's wgmma for the large tiles, mma.sync for the small ones
    gemm = [c for c in res if c.kernel == "int8_gemm"]
    assert all(any("s8.s8" in m for m in c.mma) for c in gemm)
    assert any(m.startswith("wgmma") for c in gemm for m in c.mma)
    assert any("s8.s8" in m for m in mma["fused_decode_gemm"])
    # the Hadamard product of bf16 activations runs on bf16 tensor cores with float32 accumulation
    assert any("f32.bf16.bf16.f32" in m for m in mma["rht"] | mma["rht_quant"])
    assert not mma["rice_decode"]  # integer bit manipulation only


def test_epilogues_round_like_the_reference(quick_launches):
    """The GEMM epilogues ``(acc·xs)·ws + bias`` must not become FMAs on the GPU (one rounding where the torch
    reference has two), or the compiled kernels would not be bit-exact with it as they are in the interpreter."""
    res = _compile([launch for launch in quick_launches if launch.kernel in ("int8_gemm", "fused_decode_gemm")], 90)
    assert res and all(c.fma32 == 0 for c in res), [(c.kernel, c.config, c.fma32) for c in res]
    gemm = next(launch for launch in quick_launches if launch.kernel == "int8_gemm")
    fused = dict(gemm.kwargs, enable_fp_fusion=True)  # the check sees contraction where it happens
    c = _compile([aot.Launch("g", "fusion on", gemm.fn, gemm.args, fused, gemm.configs[-1:])], 90)[0]
    assert c.fma32 > 0


def test_resource_usage_is_read_from_the_cubin(quick_launches):
    """The numbers come from the compiled binary: more warps on the same tile halve the registers needed
    per thread for the accumulator, so the 8-warp 128×256 GEMM tile must use fewer than 4 warps would."""
    gemm = next(launch for launch in quick_launches if launch.kernel == "int8_gemm")
    big = [cfg for cfg in gemm.configs if cfg.kwargs["BM"] * cfg.kwargs["BN"] == 128 * 256][:1]
    four = [triton.Config(dict(big[0].kwargs), num_warps=4, num_stages=big[0].num_stages)]
    c8 = _compile([aot.Launch("g", "8 warps", gemm.fn, gemm.args, gemm.kwargs, big)], 90)[0]
    c4 = _compile([aot.Launch("g", "4 warps", gemm.fn, gemm.args, gemm.kwargs, four)], 90)[0]
    assert c8.num_warps == 8 and c4.num_warps == 4
    assert c4.regs > c8.regs or c4.local > 0


def test_limits_are_enforced():
    """A launch over the architecture's shared-memory budget is reported, not hidden."""
    gemm = next(launch for launch in aot.record_launches(full=False) if launch.kernel == "int8_gemm")
    huge = [triton.Config({"BM": 128, "BN": 128, "BK": 256, "GROUP_M": 8}, num_warps=4, num_stages=8)]
    c = _compile([aot.Launch("g", "huge", gemm.fn, gemm.args, gemm.kwargs, huge)], 90)[0]
    assert not c.ok and "shared memory" in c.problem


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_variant_compiles(arch):
    """Every lattice, output, escape, dtype, tile and bias variant (``--compile-only`` without ``--quick``)."""
    res = _compile(aot.record_launches(full=True), arch)
    assert all(c.ok for c in res), [(c.kernel, c.variant, c.config, c.problem) for c in res if not c.ok]
    # the GEMM configurations the autotuner tries on this architecture never spill
    assert all(c.local == 0 for c in res if c.kernel == "int8_gemm"), [c.row() for c in res if c.local]


def test_gemm_configs_per_architecture():
    """Before Hopper the autotuner skips the tiles that need > 64 accumulators per thread; short token
    counts skip the tall tiles; something always remains."""
    from hq_diffusion.kernels import int8_gemm

    cfgs = int8_gemm._cuda_configs()
    acc = {id(c): c.kwargs["BM"] * c.kwargs["BN"] / (32 * c.num_warps) for c in cfgs}
    h100 = int8_gemm.select_configs(cfgs, 4096, 90)
    a100 = int8_gemm.select_configs(cfgs, 4096, 80)
    assert len(h100) == len(cfgs) and 0 < len(a100) < len(cfgs)
    assert all(acc[id(c)] <= 64 for c in a100) and any(acc[id(c)] > 64 for c in h100)
    assert all(c.kwargs["BM"] <= 16 for c in int8_gemm.select_configs(cfgs, 5, 90))
    assert int8_gemm.select_configs(cfgs[:1], 1, 80)  # never empty
