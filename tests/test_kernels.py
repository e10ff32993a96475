"""Triton kernels against their torch references (``codec.ops_ref``), and the dispatcher.

With a GPU the kernel tests (those using the ``triton_side`` fixture) run on it. Without one they run in
Triton's CPU interpreter, which must be switched on (``TRITON_INTERPRET=1``) before Triton's first import —
and diffusers imports Triton while other test modules are collected — so they run in a child pytest process
started by :func:`test_kernels_in_interpreter`, and are skipped in this one. The interpreter is ≈ 500× slower
than torch and pays per operation, not per element: sizes are small and odd on purpose (one-row tensors,
lengths that are not multiples of any block or tile, every lattice, streams with escapes, several program
groups so the persistent loops iterate).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from hq_diffusion import kernels
from hq_diffusion.codec import CodecConfig, encode, ops_ref
from hq_diffusion.kernels import dispatch
from hq_diffusion.nn.linear import hq_linear

# A test that asks for the Triton side must run it: the dispatcher's fallback warning is an error here.
pytestmark = pytest.mark.filterwarnings("error:HQ_KERNELS=triton:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture
def triton_side(monkeypatch):
    """Force the Triton side: on the GPU when there is one, else in the interpreter when this process can use
    it (the child process of :func:`test_kernels_in_interpreter`). The test fails if it used no Triton kernel
    module at all: a dispatcher that silently ran the torch reference cannot pass a kernel test."""
    pytest.importorskip("triton")
    if not CUDA and not dispatch.interpreter_usable():
        pytest.skip("no GPU: runs in the Triton interpreter, in the child process of test_kernels_in_interpreter")
    from hq_diffusion.kernels import ops

    used = []

    def counting(real):
        def kernel_module(name):
            used.append(name)
            return real(name)
        return kernel_module

    monkeypatch.setattr(dispatch, "kernel_module", counting(dispatch.kernel_module))
    monkeypatch.setattr(ops, "kernel_module", counting(ops.kernel_module))
    monkeypatch.setenv("HQ_KERNELS", "triton")
    yield
    assert used, "the test asked for the Triton side but no Triton kernel ran (silent torch fallback?)"


def test_kernels_in_interpreter():
    """Without a GPU: every ``triton_side`` test of this file, in a child pytest with ``TRITON_INTERPRET=1``."""
    pytest.importorskip("triton")
    if CUDA or dispatch.interpreter_usable():
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    kernel_tests = ("test_rht", "test_int8_gemm", "test_decode", "test_fused", "test_hq_linear_triton",
                    "test_hq_linear_matches", "test_custom_ops", "test_bench_harness")  # the tests that use the triton_side fixture
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", " or ".join(kernel_tests),
           __file__]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, r.stdout[-3000:]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _encode(shape, lattice, block, tile=64, bps=4.0, noise=None, seed=0):
    """Encode a Gaussian weight; with ``noise``, a quiet weight (std ``noise``) with one spike per row instead:
    blocks with k = 0 next to huge symbols, i.e. escaped quotients."""
    g = _gen(seed)
    w = torch.randn(*shape, generator=g)
    if noise is not None:
        w = noise * w
        rows = w.reshape(-1, shape[-1])
        for r in range(rows.shape[0]):
            rows[r, (97 * r + 5) % shape[-1]] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny tensors cannot meet the rate: irrelevant here
        q = encode(w, CodecConfig(bps=bps, lattice=lattice, block=block, tile=tile))
    return q.to(DEV)


# ---- RHT -----------------------------------------------------------------------------------------------------

RHT_CASES = [  # (M, K, tile, dtype)
    (1, 16, 8, torch.bfloat16),
    (5, 96, 32, torch.bfloat16),
    (7, 256, 256, torch.float16),
    (3, 1024, 512, torch.bfloat16),  # tile > 256: H_2 ⊗ H_256
    (2, 64, 16, torch.float32),
]


@pytest.mark.parametrize("M,K,tile,dtype", RHT_CASES)
def test_rht(triton_side, M, K, tile, dtype):
    x = torch.randn(M, K, generator=_gen(M + K)).to(dtype).to(DEV)
    y = kernels.rht(x, 3, "blocks.0.attn", tile)
    ref = ops_ref.rht_ref(x.float(), 3, "blocks.0.attn", tile)  # float32
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((y.float() - ref).abs() <= tol * ref.abs() + 1e-6 * ref.abs().max()).all()
    if dtype != torch.float32:  # the same float32 math rounded once: equal up to rare summation-order ties
        assert (y == ref.to(dtype)).float().mean() > 0.99


@pytest.mark.parametrize("tile,dtype", [(2048, torch.float32), (512, torch.bfloat16), (64, torch.float32)])
def test_rht_gpu_geometry(triton_side, monkeypatch, tile, dtype):
    """The launch geometry the GPU uses (float32 dots in chunks of 32 inputs, a shallower pipeline for large
    tiles), not the interpreter's one-chunk steps, gives the same rotation and quantization."""
    from hq_diffusion.kernels import rotate

    real = rotate._geometry
    monkeypatch.setattr(rotate, "_geometry", lambda t, dt: real(t, dt, interp=False))
    assert rotate._geometry(tile, dtype).kc < max(16, min(tile, 256)) or dtype != torch.float32
    x = torch.randn(3, 2 * tile, generator=_gen(tile)).to(dtype).to(DEV)
    ref = ops_ref.rht_ref(x.float(), 3, "g", tile)
    y = kernels.rht(x, 3, "g", tile)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((y.float() - ref).abs() <= tol * ref.abs() + 1e-6 * ref.abs().max()).all()
    xq, xs = kernels.rht_quant_int8(x, 3, "g", tile, 2 * tile)
    _check_quant(xq, xs, x, 3, "g", tile, 2 * tile, None)


def _check_quant(xq, xs, x, seed, key, tile, n_pad, gain):
    rq, rs = ops_ref.rht_quant_int8_ref(x, seed, key, tile, n_pad, gain)
    assert xq.dtype == torch.int8 and xq.shape == rq.shape and xs.dtype == torch.float32
    torch.testing.assert_close(xs, rs, rtol=1e-6, atol=0)
    diff = (xq.int() - rq.int()).abs()
    assert int(diff.max()) <= 1
    # a ±1 is allowed only where the float32 value sits on a rounding boundary (.5), and must be rare
    assert float((diff > 0).float().mean()) <= 1e-3
    if diff.any():
        xr = ops_ref.rht(torch.nn.functional.pad(x.float(), (0, n_pad - x.shape[1])), seed, key, tile)
        v = (xr * (gain if gain is not None else 1.0) / rs[:, None])[diff > 0].double()
        assert ((v.abs() - v.abs().floor() - 0.5).abs() < 1e-3).all()
    return int((diff > 0).sum())


QUANT_CASES = [  # (M, n, tile, n_pad, dtype, gain)
    (1, 100, 8, 104, torch.bfloat16, False),  # one token, padded
    (33, 200, 64, 256, torch.bfloat16, True),  # A2 gain, padded
    (4, 1000, 512, 1024, torch.bfloat16, False),
    (6, 96, 32, 96, torch.float32, False),
    (137, 137, 256, 256, torch.bfloat16, False),
]


@pytest.mark.parametrize("M,n,tile,n_pad,dtype,gain", QUANT_CASES)
def test_rht_quant_int8(triton_side, M, n, tile, n_pad, dtype, gain):
    x = torch.randn(M, n, generator=_gen(n)).to(dtype)
    if M > 2:
        x[1] = 0  # an all-zero token: scale 1, codes 0
        x[2] *= 1e4  # a large one
    x = x.to(DEV)
    g = None
    if gain:
        g = torch.ones(n_pad, device=DEV)
        g[0::2] = 3**0.5
    xq, xs = kernels.rht_quant_int8(x, 7, 12345, tile, n_pad, g)
    _check_quant(xq, xs, x, 7, 12345, tile, n_pad, g)
    if M > 2:
        assert float(xs[1]) == 1.0 and not xq[1].any()


def test_rht_quant_int8_mismatch_rate(triton_side):
    """The ±1 disagreements of int8 rounding (different float32 summation order) on a larger sample."""
    x = torch.randn(64, 2048, generator=_gen(5)).to(torch.bfloat16).to(DEV)
    xq, xs = kernels.rht_quant_int8(x, 1, "layer", 256, 2048)
    n = _check_quant(xq, xs, x, 1, "layer", 256, 2048, None)
    assert n <= xq.numel() * 1e-3


# ---- int8 GEMM ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M,N,K,bias", [(1, 1, 8, False), (37, 70, 136, True), (130, 17, 40, False),
                                        (5, 129, 1024, True), (137, 137, 137, True)])
def test_int8_gemm_dequant(triton_side, M, N, K, bias):
    g = _gen(M * N + K)
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8).to(DEV)
    wq = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEV)
    xs, ws = torch.rand(M, generator=g).to(DEV), torch.rand(N, generator=g).to(DEV)
    b = torch.randn(N, generator=g).to(torch.bfloat16).to(DEV) if bias else None
    out = kernels.int8_gemm_dequant(xq, xs, wq, ws, b)
    ref = ops_ref.int8_gemm_dequant_ref(xq, xs, wq, ws, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2 * float(ref.float().abs().max()))
    out32 = kernels.int8_gemm_dequant(xq, xs, wq, ws, b, torch.float32)
    ref32 = ops_ref.int8_gemm_dequant_ref(xq, xs, wq, ws, b, torch.float32)
    torch.testing.assert_close(out32, ref32, rtol=1e-5, atol=1e-5 * float(ref32.abs().max()))
    # the int32 accumulation is exact: unit scales give the integer product itself
    ones_m, ones_n = torch.ones(M, device=DEV), torch.ones(N, device=DEV)
    acc = kernels.int8_gemm_dequant(xq, ones_m, wq, ones_n, None, torch.float32)
    assert torch.equal(acc.double(), xq.double() @ wq.double().T)


# ---- Rice decode --------------------------------------------------------------------------------------------

DECODE_CASES = [  # (lattice, shape, block, tile, bps, noise, group)
    ("e8", (40, 256), 512, 64, 4.0, None, None),
    ("d4", (33, 96), 64, 32, 4.0, None, None),
    ("a2", (7, 100), 128, 64, 4.0, None, None),
    ("z", (1, 64), 8, 64, 4.0, None, None),  # one row, 8 blocks of the smallest size
    ("e8", (2, 3, 64), 64, 64, 4.0, None, None),  # rows from leading dims
    # escapes (codes beyond int8 → int16), 6 groups > 4 programs: the persistent loop iterates
    ("e8", (6, 1024), 256, 8, 4.0, 1e-3, 128),
    ("d4", (6, 1024), 256, 8, 4.0, 1e-3, 256),
    ("a2", (6, 1024), 256, 8, 3.0, 1e-2, 512),  # escapes in one stream only, int8 codes
    ("z", (6, 1024), 256, 8, 4.0, 1e-3, 1024),
]


@pytest.mark.parametrize("lattice,shape,block,tile,bps,noise,group", DECODE_CASES)
def test_decode(triton_side, lattice, shape, block, tile, bps, noise, group):
    q = _encode(shape, lattice, block, tile, bps, noise)
    if noise is not None:
        assert sum(s.escapes.numel() for s in q.streams) > 0, "the test weight must produce escapes"
    launch = dispatch.kernel_module("rice_decode").decode_launch
    codes = launch(q, "codes", group=group) if group else kernels.decode(q, "codes")
    ref = ops_ref.decode_ref(q, "codes")
    assert codes.dtype == ref.dtype and codes.shape == ref.shape
    assert torch.equal(codes, ref)
    rot = launch(q, "rotated", group=group) if group else kernels.decode(q, "rotated")
    rref = ops_ref.decode_ref(q, "rotated", torch.float32)
    assert rot.dtype == torch.bfloat16 and rot.shape == rref.shape
    assert ((rot.float() - rref).abs() <= 1e-2 * rref.abs()).all()
    assert torch.equal(rot, rref.to(torch.bfloat16))  # same float32 math, one rounding


def test_decode_log8_scales(triton_side):
    """A log8 scale section (codec/scales.py) reaches the kernels as float32 scale / α: same result as the
    reference, and the fused decode + GEMM too."""
    w = torch.randn(19, 160, generator=_gen(7)) * torch.logspace(-2, 1, 19).unsqueeze(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = encode(w, CodecConfig(bps=4.0, block=128, tile=32, scale_dtype="log8")).to(DEV)
    rot = kernels.decode(q, "rotated")
    assert torch.equal(rot, ops_ref.decode_ref(q, "rotated", torch.float32).to(torch.bfloat16))
    x = torch.randn(3, 160, generator=_gen(8)).to(torch.bfloat16).to(DEV)
    xq, xs = ops_ref.rht_quant_int8_ref(x, q.seed, q.key, q.tile, q.n_pad)
    assert torch.equal(kernels.fused_decode_gemm(xq, xs, q, None), ops_ref.fused_decode_gemm_ref(xq, xs, q, None))


# ---- fused decode + GEMM ------------------------------------------------------------------------------------

FUSED_CASES = [  # (lattice, shape, block, tile, bps, noise, tokens, bias)
    ("e8", (40, 256), 512, 64, 4.0, None, 3, True),
    ("d4", (24, 128), 64, 64, 4.0, None, 16, False),
    ("a2", (17, 96), 128, 32, 4.0, None, 1, True),
    ("z", (5, 64), 64, 64, 4.0, None, 7, True),
    ("d4", (6, 1024), 256, 8, 3.0, 1e-2, 5, True),  # escapes
    ("e8", (20, 64), 2**16, 64, 4.0, None, 4, True),  # unsupported layout: decode + GEMM fallback
]


@pytest.mark.parametrize("lattice,shape,block,tile,bps,noise,tokens,bias", FUSED_CASES)
def test_fused_decode_gemm(triton_side, lattice, shape, block, tile, bps, noise, tokens, bias):
    q = _encode(shape, lattice, block, tile, bps, noise)
    assert q.fits_int8
    fused = dispatch.kernel_module("fused")
    assert fused.fused_supported(q, tokens) == (block < 2**16)
    if noise is not None:
        assert sum(s.escapes.numel() for s in q.streams) > 0
    g = _gen(tokens)
    x = torch.randn(tokens, shape[1], generator=g).to(torch.bfloat16).to(DEV)
    xq, xs = ops_ref.rht_quant_int8_ref(x, q.seed, q.key, q.tile, q.n_pad)
    b = torch.randn(shape[0], generator=g).to(torch.bfloat16).to(DEV) if bias else None
    out = kernels.fused_decode_gemm(xq, xs, q, b)
    ref = ops_ref.fused_decode_gemm_ref(xq, xs, q, b)
    assert out.dtype == torch.bfloat16 and out.shape == (tokens, shape[0])
    assert torch.equal(out, ref)


# ---- hq_linear ----------------------------------------------------------------------------------------------


class _Layer:
    """The interface hq_linear reads from HQLinear."""

    def __init__(self, q, bias, mma, codes=None):
        self.q, self.bias, self.mma, self.codes = q, bias, mma, codes

    def encoded(self):
        return self.q


@pytest.mark.parametrize("lattice,tokens,mma,stored", [("a2", 3, "int8", False), ("e8", 40, "int8", False),
                                                       ("e8", 5, "int8", True), ("d4", 6, "bf16", False)])
def test_hq_linear_triton_vs_torch(triton_side, monkeypatch, lattice, tokens, mma, stored):
    q = _encode((48, 200), lattice, 256)
    g = _gen(1)
    b = torch.randn(48, generator=g).to(torch.bfloat16).to(DEV)
    codes = ops_ref.decode_ref(q, "codes").reshape(48, q.n_pad) if stored else None
    layer = _Layer(q, b, mma, codes)
    x = torch.randn(2, tokens, 200, generator=g).to(torch.bfloat16).to(DEV)
    y = hq_linear(x, layer)
    monkeypatch.setenv("HQ_KERNELS", "torch")
    ref = hq_linear(x, layer)
    assert y.shape == (2, tokens, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * float(ref.float().abs().max()))


@pytest.mark.parametrize("lattice,tokens,mma,storage", [("e8", 4, "int8", "rice"), ("a2", 24, "int8", "rice"),
                                                        ("e8", 24, "int8", "int8"), ("d4", 5, "bf16", "rice")])
def test_hq_linear_matches_hqlinear_native(triton_side, lattice, tokens, mma, storage):
    """kernels.hq_linear on a real HQLinear computes what its forward_native computes."""
    linear_mod = pytest.importorskip("hq_diffusion.nn.linear")
    lin = torch.nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 96, generator=_gen(4)))
        lin.bias.copy_(torch.randn(40, generator=_gen(5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = linear_mod.HQLinear.from_linear(lin, CodecConfig(bps=4.0, lattice=lattice, block=64), key="blk.0.ff",
                                            mma=mma, storage=storage).to(DEV)
    x = torch.randn(2, tokens, 96, generator=_gen(6)).to(torch.bfloat16).to(DEV)
    y = hq_linear(x, m)
    ref = m.forward_native(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * float(ref.float().abs().max()))


def test_hq_linear_reference_paths(monkeypatch):
    """CPU reference: int8 ≈ bf16 path ≈ the dequantized weight; 'auto' on CPU is bf16; fp8 is not ours."""
    monkeypatch.setenv("HQ_KERNELS", "torch")
    g = _gen(2)
    w = torch.randn(32, 128, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = encode(w, CodecConfig(bps=5.0, lattice="e8", block=256))
    from hq_diffusion.codec import decode

    wd = decode(q)
    x = torch.randn(9, 128, generator=g).to(torch.bfloat16)
    exact = x.float() @ wd.T
    for mma in ("int8", "bf16", "auto"):
        y = hq_linear(x, _Layer(q, None, mma))
        assert float((y.float() - exact).norm() / exact.norm()) < 0.02
    with pytest.raises(NotImplementedError):
        hq_linear(x, _Layer(q, None, "fp8"))
    with pytest.raises(ValueError):
        hq_linear(x[:, :100], _Layer(q, None, "int8"))


# ---- dispatcher ---------------------------------------------------------------------------------------------


def test_dispatch_choices(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.delenv("HQ_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.backend(t) == "torch"  # CPU tensors → reference
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.backend(t) == "torch"  # the interpreter is opt-in
    monkeypatch.setenv("HQ_KERNELS", "torch")
    assert dispatch.backend(t) == "torch"
    monkeypatch.setenv("HQ_KERNELS", "triton")
    if dispatch.interpreter_usable():  # the interpreter was on before Triton's first import
        assert dispatch.backend(t) == "triton"
    else:  # Triton already imported compiled (or missing): no interpreter, the reference, a warning
        with pytest.warns(RuntimeWarning, match="torch reference"):
            assert dispatch.backend(t) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.warns(RuntimeWarning, match="torch reference"):
        assert dispatch.backend(t) == "torch"
    monkeypatch.setenv("HQ_KERNELS", "cuda")
    with pytest.raises(ValueError, match="HQ_KERNELS"):
        dispatch.backend(t)
    if CUDA:
        monkeypatch.delenv("HQ_KERNELS")
        assert dispatch.backend(t.cuda()) == "triton"


def test_no_kernel_launch_without_gpu_or_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET never reach a kernel module, even with HQ_KERNELS=triton."""
    def boom(name):
        raise AssertionError(f"kernel module {name} loaded")

    monkeypatch.setattr(dispatch, "kernel_module", boom)
    monkeypatch.setattr(dispatch, "_ops", lambda: boom("ops"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = _encode((16, 64), "e8", 64).to("cpu")
    x = torch.randn(3, 64, generator=_gen(3)).to(torch.bfloat16)
    for mode in ("auto", "triton"):
        monkeypatch.setenv("HQ_KERNELS", mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            y = hq_linear(x, _Layer(q, None, "int8"))
            kernels.decode(q, "codes")
        assert y.shape == (3, 16)


def test_custom_ops_fake():
    """The registered ops have fake implementations (shapes and dtypes without running a kernel, so without
    the Triton side: it runs in both processes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hq_diffusion.kernels import ops

    with FakeTensorMode():
        x = torch.empty(5, 100, dtype=torch.bfloat16)
        q, s = ops.rht_quant_int8_op(x, 0, 1, 64, 128, None)
        assert q.shape == (5, 128) and q.dtype == torch.int8 and s.shape == (5,)
        y = ops.int8_gemm_dequant_op(q, s, torch.empty(7, 128, dtype=torch.int8), torch.empty(7), None,
                                     torch.bfloat16)
        assert y.shape == (5, 7) and y.dtype == torch.bfloat16
        assert ops.rht_op(torch.empty(3, 64), 0, 1, 64).shape == (3, 64)


# ---- benchmark script ---------------------------------------------------------------------------------------


def test_bench_kernels_dry_run(capsys):
    from hq_diffusion.bench import kernels as bench

    assert bench.main(["--dry-run", "--models", "ltx"]) == 0
    out = capsys.readouterr().out
    assert "2048→2048" in out and "unique linear shapes" in out


def test_bench_harness(triton_side, monkeypatch, capsys):
    """``hq-diffusion bench kernels`` end to end on one small shape: every measured path runs and the
    on-device re-check against the references says ok. In the interpreter each timing is one plain call."""
    import argparse

    from hq_diffusion.bench import kernels as kb

    if not CUDA:
        monkeypatch.setattr(kb, "_bench", lambda fn: (fn(), (1.0, 1.0, 1.0))[1])
        monkeypatch.setattr(kb, "_copy_bandwidth", lambda dev: 1.0)
    a = argparse.Namespace(bps=4.0, lattice="e8", block=4096, out=None)
    assert kb._run(a, [(256, 128)], [16], "hq-diffusion bench kernels (test)", DEV) == 0
    out = capsys.readouterr().out
    for section in ("**Decode**", "**RHT of activations**", "**int8 GEMM", "**One linear layer", "**Small-token"):
        assert section in out
    rows = [line for line in out.splitlines() if line.startswith("| 256→128 |")]
    assert len(rows) == 1 + 1 + 1 + 1 + 2  # decode, RHT, GEMM, layer at 16 tokens; small regime at 1 and 16
    assert rows[0].rstrip(" |").endswith("ok"), rows[0]  # the GPU check column
    assert "nan" not in rows[-1] and "nan" not in rows[-2]  # the fused path ran at 1 and 16 tokens
