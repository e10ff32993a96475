"""HQLinear: every matmul path against its float / ops_ref reference, shapes, dtypes, buffers, round trips."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hq_diffusion.codec import CodecConfig, HQFormatError, decode, encode
from hq_diffusion.codec.lattice import axis_gain
from hq_diffusion.codec.ops_ref import int8_gemm_dequant_ref, rht_quant_int8_ref
from hq_diffusion.nn import lowp
from hq_diffusion.nn.linear import MMA_PATHS, HQLinear, SimulatedFormatWarning, validate_meta

FORMATS = ("fp8", "nvfp4", "mxfp4")


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).requires_grad_(False)
    if bias:
        lin.bias.normal_(0, 0.1)
    return lin


def _hq(lin, bps=4.0, lattice="e8", key="blocks.0.attn.to_q", **kw) -> HQLinear:
    """storage ``"rans"`` here: the bitstream storage with ``coder="rans"`` (the layer then stores rANS streams)."""
    coder = "rans" if kw.get("storage") == "rans" else "rice"
    if coder == "rans":
        kw["storage"] = "rice"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny tensors: RateBudgetWarning
        m = HQLinear.from_linear(lin, CodecConfig(bps=bps, lattice=lattice, coder=coder), key=key, backend="native",
                                 **kw)
    assert m.storage == (coder if kw.get("storage", "rice") == "rice" else kw["storage"])
    return m


def _snr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.square().sum() / (out - ref).square().sum()))


@pytest.mark.parametrize("k", [1000, 7, 1152, 3840])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("storage", ["rice", "int8", "rans"])
def test_bf16_path_equals_linear_of_decoded_weight(k, bias, storage):
    lin = _linear(k, 24, bias)
    m = _hq(lin, mma="bf16", storage=storage)
    q = encode(lin.weight, CodecConfig(bps=4.0, coder="rans" if storage == "rans" else "rice"), key="blocks.0.attn.to_q")
    x = torch.randn(2, 3, k)
    out = m.forward_native(x)
    ref = F.linear(x, decode(q), lin.bias)
    assert out.shape == (2, 3, 24) and out.dtype == torch.float32
    # the same product computed in another basis: only fp32 rounding differs
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("lattice", ["e8", "d4", "a2", "z"])
@pytest.mark.parametrize("storage", ["rice", "int8"])
def test_int8_path_is_exactly_the_ops_ref_composition(lattice, storage):
    lin = _linear(192, 40)
    m = _hq(lin, lattice=lattice, mma="int8", storage=storage)
    x = torch.randn(5, 192, dtype=torch.bfloat16)
    out = m.forward_native(x)
    codes = decode(m.encoded(), "codes") if storage == "rice" else m.codes
    xq, xs = rht_quant_int8_ref(x, m.seed, m.key, m.tile, m.n_pad, gain=axis_gain(lattice, m.n_pad))
    ws = m.scales.view(torch.float16).float() / m.alpha
    ref = int8_gemm_dequant_ref(xq, xs, codes, ws, m.bias, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    # and it approximates the float linear
    assert _snr(lin(x.float()), out.float()) > 15


def test_output_snr_rises_with_bps():
    lin = _linear(512, 128, seed=1)
    x = torch.randn(64, 512)
    ref = lin(x)
    for mma in ("bf16", "int8"):
        snrs = [_snr(ref, _hq(lin, bps=b, mma=mma).forward_native(x)) for b in (2.0, 3.0, 4.0, 5.0)]
        assert all(b > a + 3 for a, b in zip(snrs, snrs[1:])), (mma, snrs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_simulated_formats_warn_and_approximate(fmt):
    lin = _linear(256, 64)
    m = _hq(lin, mma=fmt)
    x = torch.randn(3, 7, 256)
    with pytest.warns(SimulatedFormatWarning, match="simulated"):
        out = m.forward_native(x)
    assert out.shape == (3, 7, 64) and torch.isfinite(out).all()
    floor = {"fp8": 18, "nvfp4": 12, "mxfp4": 11}[fmt]
    assert _snr(lin(x), out) > floor
    # the fp4 formats are coarser than fp8, which is close to the bf16 path
    bf16 = _snr(lin(x), _hq(lin, mma="bf16").forward_native(x))
    assert _snr(lin(x), out) <= bf16 + 0.5


def test_e2m1_rounding_grid_and_ties():
    v = torch.tensor([0.0, 0.25, 0.3, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.75, -2.5, -100.0])
    want = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -2.0, -6.0])
    assert torch.equal(lowp.round_e2m1(v), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quant_keeps_zeros_and_is_idempotent(fmt):
    quant, blk = lowp.FAKE_QUANT[fmt]
    x = torch.randn(4, 64) * torch.logspace(-3, 3, 64)
    x[1] = 0
    x[2, :32] = 0
    q = quant(x)
    assert torch.isfinite(q).all() and (q[1] == 0).all() and (q[2, :32] == 0).all()
    if fmt != "nvfp4":  # nvfp4's second-level scale follows the row maximum, which rounding moves
        assert torch.equal(quant(q), q)  # representable values are fixed points


def test_mxfp4_scales_are_powers_of_two():
    x = torch.randn(3, 64)
    q = lowp.fake_quant_mxfp4(x).reshape(3, 2, 32)
    amax = x.reshape(3, 2, 32).abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    assert torch.equal(lowp.round_e2m1(q / scale) * scale, q)
    assert ((q / scale).abs() <= 6).all()


@pytest.mark.parametrize("mma", ["bf16", "int8", "fp8"])
@pytest.mark.parametrize("shape", [(1, 96), (96,), (2, 3, 4, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_shapes_and_dtypes(mma, shape, dtype):
    lin = _linear(96, 33)
    m = _hq(lin, mma=mma)
    x = torch.randn(shape).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SimulatedFormatWarning)
        out = m(x)
    assert out.shape == (*shape[:-1], 33) and out.dtype == dtype and torch.isfinite(out).all()
    assert _snr(lin(x.float()), out.float()) > 12


def test_auto_is_bf16_on_cpu_and_kernel_backend_falls_back():
    lin = _linear(128, 16)
    m = _hq(lin, mma="auto")
    assert m.resolved_mma(torch.device("cpu")) == "bf16"
    x = torch.randn(4, 128)
    m.backend = "kernel"
    out_k = m(x)
    assert torch.equal(out_k, m.forward_native(x))
    assert torch.equal(out_k, MMA_PATHS["bf16"](m, x))


@pytest.mark.parametrize("storage", ["rice", "int8"])
def test_buffers_are_integers_and_state_dict_round_trips(storage):
    lin = _linear(200, 48)
    m = _hq(lin, mma="bf16", storage=storage)
    assert all(not b.is_floating_point() for b in m.buffers())
    assert [n for n, _ in m.named_parameters()] == ["bias"]
    assert m.nbytes == sum(t.numel() * t.element_size() for t in m.state_dict().values())
    x = torch.randn(6, 200)
    out = m(x)
    m2 = HQLinear.from_meta(m.hq_meta, name="copy")
    assert all(t.device.type == "meta" for t in m2.state_dict().values())
    m2.load_state_dict(m.state_dict(), assign=True)
    assert torch.equal(m2(x), out)
    # a dtype cast touches the bias only: the row scales are stored as raw bits
    scales = m.scales.clone()
    m.to(torch.bfloat16)
    assert torch.equal(m.scales, scales) and m.bias.dtype == torch.bfloat16
    out16 = m(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and _snr(out, out16.float()) > 30


def test_encoded_wraps_buffers_without_copy_and_matches_the_codec():
    lin = _linear(300, 20)
    m = _hq(lin)
    q = m.encoded()
    assert q.scales.data_ptr() == m.scales.data_ptr()
    assert q.streams[0].unary.data_ptr() == m.s0_unary.data_ptr()
    assert q.to_bytes() == encode(lin.weight, CodecConfig(bps=4.0), key="blocks.0.attn.to_q").to_bytes()
    assert m.hq_meta["bps"] == pytest.approx(q.bps)
    assert m.hq_meta["snr_db"] == pytest.approx(_snr(lin.weight, m.dequantize()), abs=1e-3)


def test_int8_storage_encoded_is_a_metadata_view():
    m = _hq(_linear(100, 8), storage="int8")
    q = m.encoded()
    assert q.streams == [] and q.scales.data_ptr() == m.scales.data_ptr()
    assert (q.shape, q.n_pad, q.tile, q.key, q.alpha) == ((8, 100), m.n_pad, m.tile, m.key, m.alpha)
    with pytest.raises(HQFormatError):
        decode(q)


def test_extra_repr_and_metadata():
    m = _hq(_linear(64, 8), mma="int8", storage="int8")
    r = repr(m)
    for s in ("in_features=64", "out_features=8", "bps=", "lattice=e8", "mma=int8", "storage=int8"):
        assert s in r
    import json

    assert json.loads(json.dumps(m.hq_meta)) == m.hq_meta


def test_int8_falls_back_when_codes_exceed_int8():
    lin = _linear(256, 32)
    with pytest.warns(UserWarning, match="int8"):
        m = HQLinear.from_linear(lin, CodecConfig(bps=8.0), key="x", mma="int8")
    assert not m.fits_int8 and m.mma == "bf16"
    with pytest.raises(ValueError, match="int8"):
        m.mma = "int8"


def test_bad_arguments_and_invalid_weights():
    lin = _linear(64, 8)
    with pytest.raises(ValueError, match="mma"):
        HQLinear.from_linear(lin, key="x", mma="int4")
    with pytest.raises(ValueError, match="storage"):
        HQLinear.from_linear(lin, key="x", storage="zip")
    with pytest.raises(ValueError, match="backend"):
        HQLinear.from_linear(lin, key="x", backend="cuda")
    lin.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="blocks.7.ff"):
        HQLinear.from_linear(lin, key="blocks.7.ff")


def test_validate_meta_rejects_inconsistent_metadata():
    meta = _hq(_linear(100, 8)).hq_meta
    for field, value in [("n_pad", 100), ("tile", 48), ("tile", 2048), ("alpha", -1.0), ("lattice", "e9"),
                         ("version", 2), ("in_features", 0), ("fits_int8", "yes")]:
        bad = {**meta, field: value}
        with pytest.raises(HQFormatError):
            validate_meta(bad, "layer")
    bad = {**meta, "streams": [{**meta["streams"][0], "n": 7}]}
    with pytest.raises(HQFormatError, match="symbols"):
        validate_meta(bad, "layer")


@pytest.mark.parametrize("storage,mma", [("rice", "bf16"), ("rice", "int8"), ("int8", "int8"), ("rans", "bf16"),
                                         ("rans", "int8")])
def test_kernel_seam_matches_native(storage, mma):
    """``hq_diffusion.kernels.hq_linear(x, module)`` (its torch reference on CPU) reads the module correctly."""
    kernels = pytest.importorskip("hq_diffusion.nn.linear")
    if not hasattr(kernels, "hq_linear"):
        pytest.skip("hq_diffusion.kernels has no hq_linear in this build")
    m = _hq(_linear(320, 24, seed=3), lattice="a2", mma=mma, storage=storage)
    x = torch.randn(2, 5, 320)
    assert torch.equal(kernels.hq_linear(x, m), m.forward_native(x))


@pytest.mark.parametrize("storage,mma,tokens", [("rice", "int8", 3), ("rice", "int8", 40), ("int8", "int8", 5),
                                                ("rice", "bf16", 4), ("int8", "bf16", 4), ("rice", "fp8", 4),
                                                ("rans", "int8", 3), ("rans", "int8", 40), ("rans", "bf16", 4)])
def test_both_backends_compose_the_same_ops(monkeypatch, storage, mma, tokens):
    """Each backend only picks an op set (``OP_SETS``): the same ops are called the same way for both."""
    from hq_diffusion.codec import ops_ref
    from hq_diffusion.nn import linear

    calls = []

    def spy(name):
        def op(*args, **kwargs):
            calls.append(name)
            return getattr(ops_ref.REFERENCE, name)(*args, **kwargs)
        return op

    names = ("rht", "rht_quant_int8", "int8_gemm_dequant", "decode", "fused_decode_gemm")
    spy_set = ops_ref.OpSet("spy", *(spy(n) for n in names))
    m = _hq(_linear(96, 24, seed=2), lattice="d4", mma=mma, storage=storage)
    x = torch.randn(2, tokens, 96)
    ref = m.forward_native(x)
    seen = {}
    for backend in ("native", "kernel"):
        monkeypatch.setitem(linear.OP_SETS, backend, spy_set)
        m.backend = backend
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulatedFormatWarning)
            assert torch.equal(m(x), ref)
        seen[backend] = list(calls)
    assert seen["native"] == seen["kernel"]
    if mma in FORMATS:
        assert seen["kernel"] == []  # simulated formats compose the reference set whichever backend
    else:
        assert "rht" in seen["kernel"] or "rht_quant_int8" in seen["kernel"]
