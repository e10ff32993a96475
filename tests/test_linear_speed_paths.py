"""The CPU codes path of HQLinear's bf16 forward (nn/cpu_forward.py), its int8 E8 unstrip, and the per-step
code cache: same integers as the codec, outputs as accurate as the generic path, nothing float kept."""
from __future__ import annotations

import warnings

import pytest
import torch

from hq_diffusion.codec import CodecConfig, HQFormatError, decode, encode
from hq_diffusion.codec import strip as codec_strip
from hq_diffusion.codec.lattice import nearest
from hq_diffusion.nn import cpu_forward
from hq_diffusion.nn.linear import HQLinear


def _gen(s):
    return torch.Generator().manual_seed(s)


def _e8_points(m: int, scale: float, seed: int) -> torch.Tensor:
    y = nearest("e8", torch.randn(m * 8, generator=_gen(seed)) * scale).reshape(-1, 8).to(torch.int32)
    return y


@pytest.mark.parametrize("m,scale", [(1, 3.0), (7, 0.01), (5000, 8.0), (70001, 20.0)])
def test_unstrip_e8_int8_equals_unstrip(m, scale):
    y = _e8_points(m, scale, m)
    y[0] = torch.tensor([127, 1, 1, 1, 1, 1, 1, -1]) if m > 1 else y[0]  # extremes stay exact
    if m > 2:
        y[1] = torch.tensor([-127, -127, 1, 1, 1, 1, 1, 1])
        y[2] = torch.tensor([-126, 126, 0, 0, 0, 0, 0, 0])
    assert int(y.abs().max()) <= 127
    z = codec_strip.strip("e8", y)[0]
    got = codec_strip.unstrip_e8_int8(z)
    assert got.dtype == torch.int8 and got.shape == (m, 8)
    assert torch.equal(got.to(torch.int32), codec_strip.unstrip("e8", [z], (m, 8)))
    assert torch.equal(got.to(torch.int32), y)


def test_unstrip_e8_int8_rejects_what_it_cannot_hold():
    z = codec_strip.strip("e8", _e8_points(4, 3.0, 0))[0]
    with pytest.raises(ValueError, match="multiple of 8"):
        codec_strip.unstrip_e8_int8(z[:-1])
    bad = z.clone()
    bad[3] = 128
    with pytest.raises(ValueError, match="0..127"):
        codec_strip.unstrip_e8_int8(bad)


def _layer(n_out, n_in, lattice="e8", storage="rice", bps=4.0, seed=0):
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=_gen(seed)) / n_in**0.5)
        lin.bias.copy_(torch.randn(n_out, generator=_gen(seed + 1)) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lin, HQLinear.from_linear(lin, CodecConfig(bps=bps, lattice=lattice, block=64), key="t.l",
                                         storage=storage, mma="bf16")


def _generic(m, x, monkeypatch):
    monkeypatch.setattr(cpu_forward, "ENABLED", False)
    try:
        return m(x)
    finally:
        monkeypatch.setattr(cpu_forward, "ENABLED", True)


def _snr(ref, y):
    return float(10 * torch.log10(ref.double().square().sum() / (y.double() - ref.double()).square().sum()))


@pytest.mark.parametrize("lattice", ["e8", "d4", "a2", "z"])
@pytest.mark.parametrize("storage", ["rice", "int8"])
@pytest.mark.parametrize("n_in,dtype", [(777, torch.bfloat16), (1000, torch.float32), (96, torch.bfloat16)])
def test_codes_path_matches_the_generic_path(monkeypatch, lattice, storage, n_in, dtype):
    lin, m = _layer(24, n_in, lattice, storage)
    x = torch.randn(2, 5, n_in, generator=_gen(3)).to(dtype)
    calls = []
    real = cpu_forward.mma_codes_cpu
    monkeypatch.setattr(cpu_forward, "mma_codes_cpu", lambda *a: calls.append(1) or real(*a))
    from hq_diffusion.nn import linear
    monkeypatch.setattr(linear, "mma_codes_cpu", cpu_forward.mma_codes_cpu)
    y = m(x)
    assert calls, "the CPU codes path did not run"
    ref_q = _generic(m, x, monkeypatch)
    assert y.dtype == dtype and y.shape == (2, 5, 24)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), ref_q.float(), rtol=tol, atol=tol * float(ref_q.float().abs().max()))
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert _snr(ref, y.float()) >= _snr(ref, ref_q.float()) - 0.05  # no weight rounded: never worse


def test_float16_and_kernel_requests_keep_the_generic_path(monkeypatch):
    _, m = _layer(8, 64)
    x = torch.randn(3, 64, generator=_gen(0))
    assert cpu_forward.codes_path_applies(m, x, None)
    assert not cpu_forward.codes_path_applies(m, x.half(), None)
    monkeypatch.setenv("HQ_KERNELS", "triton")
    assert not cpu_forward.codes_path_applies(m, x, None)
    monkeypatch.setattr(cpu_forward, "ENABLED", False)
    monkeypatch.setenv("HQ_KERNELS", "auto")
    assert not cpu_forward.codes_path_applies(m, x, None)


def test_decode_int8_equals_the_codec_and_checks_the_flag():
    _, m = _layer(16, 777)
    q = m.encoded()
    from hq_diffusion.codec.ops_ref import REFERENCE
    assert torch.equal(cpu_forward.decode_int8(q, REFERENCE), decode(q, out="codes").reshape(16, q.n_pad))
    w = torch.randn(8, 64, generator=_gen(5)) * 0.01
    w[0, 0] = 50.0  # a huge symbol in a stream flagged as fitting int8
    qq = encode(w, CodecConfig(bps=8.0))
    assert not qq.fits_int8
    qq.fits_int8 = True
    with pytest.raises(HQFormatError, match="out of range"):
        cpu_forward.decode_int8(qq, REFERENCE)


def test_non_finite_scale_is_an_error():
    _, m = _layer(8, 64)
    m.alpha = 1e-45  # scale / α overflows float32
    with pytest.raises(HQFormatError, match="not finite"):
        m(torch.randn(2, 64))


def test_cached_codes_decodes_once_per_block_and_frees(monkeypatch):
    _, m = _layer(16, 777)
    model = torch.nn.Sequential(m, torch.nn.ReLU())
    calls = []
    real = cpu_forward.decode_int8
    monkeypatch.setattr(cpu_forward, "decode_int8", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 777, generator=_gen(1)).to(torch.bfloat16)
    plain = m(x)
    assert len(calls) == 1
    with cpu_forward.cached_codes(model) as n:
        assert n == 1
        ys = [m(x) for _ in range(3)]
        assert len(calls) == 2 and cpu_forward.cached_bytes(model) == 16 * m.n_pad
        assert not any(t.is_floating_point() for t in m.__dict__.values() if isinstance(t, torch.Tensor))
        with pytest.raises(ValueError, match="already inside"):
            with cpu_forward.cached_codes(model):
                pass
    assert all(torch.equal(y, plain) for y in ys)
    assert cpu_forward.cached_bytes(model) == 0 and not hasattr(m, "_hq_cached_codes")
    with pytest.raises(RuntimeError):
        with cpu_forward.cached_codes(model):
            m(x)
            raise RuntimeError("step failed")
    assert not hasattr(m, "_hq_cached_codes")  # freed on the error path too
    m(x)
    assert len(calls) == 4  # outside a block every call decodes


def test_bench_forward_table_small():
    from hq_diffusion.bench.forward_peers import forward_table

    text = forward_table(64, 256, 4, 4.0, 1, 1)
    assert "HQLinear rice, CPU codes path" in text and "codes cached for the step" in text
    assert "GGUF Q4_0" in text or "gguf:" in text  # measured, or listed with the reason
