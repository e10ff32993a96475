"""The codec end to end: exactness, shapes/dtypes, rate accounting, determinism, bad input, fuzzing."""
import math
import random
import warnings

import pytest
import torch

from hq_diffusion.codec import (CodecConfig, EncodedTensor, HQFormatError, RateBudgetWarning, decode, encode,
                                rotated_rows)
from hq_diffusion.bench.tails import heavy_tailed
from hq_diffusion.codec.rate import alpha_for_rate

LATTICE_NAMES = ["e8", "d4", "a2", "z"]


def _encode(w, cfg, key=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RateBudgetWarning)
        return encode(w, cfg, key=key)


def _dn_nearest(x):
    """Nearest point of D_n = {z ∈ Z^n: Σz even} (Conway & Sloane, SPLAG ch. 20): round, and when the sum is odd
    round the worst coordinate the other way. x: float64 (N, n)."""
    f = torch.round(x)
    odd = (f.sum(-1) % 2) != 0
    err = x - f
    worst = err.abs().argmax(-1, keepdim=True)
    step = torch.where(err.gather(-1, worst) >= 0, 1.0, -1.0).to(f.dtype)
    g = f.scatter_add(-1, worst, step)
    return torch.where(odd.unsqueeze(-1), g, f)


def _closer(v, a, b):
    return torch.where(((a - v).square().sum(-1) <= (b - v).square().sum(-1)).unsqueeze(-1), a, b)


def _independent_nearest(lattice, v):
    """Nearest lattice point of ``v`` (float64 (N, dim), physical units), written from the lattice definitions,
    not from the codec: 2·E8 = 2·D8 ∪ (2·D8 + 1); 2·D4; A2 = {(√3·a, b): a + b even} = two rectangular cosets;
    Z. Returns the physical point, float64 (N, dim)."""
    if lattice == "z":
        return torch.round(v)
    if lattice == "d4":
        return 2 * _dn_nearest(v / 2)
    if lattice == "e8":
        return _closer(v, 2 * _dn_nearest(v / 2), 2 * _dn_nearest((v - 1) / 2) + 1)
    r3 = math.sqrt(3.0)
    even = torch.stack([2 * r3 * torch.round(v[:, 0] / (2 * r3)), 2 * torch.round(v[:, 1] / 2)], -1)
    odd = torch.stack([2 * r3 * torch.round((v[:, 0] - r3) / (2 * r3)) + r3,
                       2 * torch.round((v[:, 1] - 1) / 2) + 1], -1)
    return _closer(v, even, odd)


def _assert_codes_are_nearest(w, q, cfg, codes, key=0):
    """The codes are lattice points nearest to the scaled rotated rows, checked against an independent
    quantizer (ties, where two points are equally near, may go either way)."""
    from hq_diffusion.codec.lattice import LATTICES, is_member, to_physical

    u, _ = rotated_rows(w, cfg.tile, cfg.seed, key)
    s = q.scales.float()
    v = (u / torch.where(s > 0, s, 1.0).unsqueeze(1) * q.alpha).reshape(-1, LATTICES[q.lattice].dim)
    y = codes.reshape(v.shape).to(torch.int64)
    assert is_member(q.lattice, y).all()
    v = v.double()
    ref = _independent_nearest(q.lattice, v)
    got = to_physical(q.lattice, y).double()
    d_got, d_ref = (got - v).square().sum(-1), (ref - v).square().sum(-1)
    assert torch.allclose(d_got, d_ref, atol=1e-4, rtol=1e-6), float((d_got - d_ref).abs().max())
    differ = ((got - ref).abs() > 1e-3).any(-1)  # another point (a2's √3 is float32 in the codec)
    assert int(differ.sum()) <= max(2, v.shape[0] // 10000), int(differ.sum())  # ties only


def snr_db(w, w_hat):
    w, w_hat = w.double(), w_hat.double()
    return 10 * math.log10(float(w.square().sum() / (w - w_hat).square().sum()))


@pytest.mark.parametrize("lattice", LATTICE_NAMES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (257, 1000), (1000, 4096), (5, 4097), (2, 3, 40), (33,)])
def test_codes_are_exact(lattice, shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g)
    cfg = CodecConfig(bps=4.0, lattice=lattice)
    q = _encode(w, cfg, key="layer")
    codes = decode(q, out="codes")
    assert codes.shape == q.codes_shape
    assert codes.dtype == torch.int8 and q.fits_int8
    _assert_codes_are_nearest(w, q, cfg, codes, key="layer")
    w_hat = decode(q)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    assert q.numel == w.numel()


@pytest.mark.slow
@pytest.mark.parametrize("lattice", LATTICE_NAMES)
def test_codes_are_exact_large(lattice):
    w = torch.randn(3072, 5120, dtype=torch.bfloat16)
    cfg = CodecConfig(bps=4.0, lattice=lattice)
    q = encode(w, cfg)
    _assert_codes_are_nearest(w, q, cfg, decode(q, out="codes"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtype_round_trip(dtype):
    w = torch.randn(16, 256).to(dtype)
    q = encode(w, CodecConfig(bps=5.0))
    w_hat = decode(q)
    assert w_hat.dtype == dtype and w_hat.shape == w.shape
    assert snr_db(w, w_hat) > 25
    assert torch.equal(EncodedTensor.from_bytes(q.to_bytes()).scales, q.scales)


def test_rate_is_total_and_close_to_budget():
    w = torch.randn(512, 2048)
    for bps in (2.0, 3.0, 4.0, 5.0):
        q = encode(w, CodecConfig(bps=bps))
        assert q.total_bits == 8 * len(q.to_bytes())
        assert q.bps <= bps
        assert q.bps > bps - 0.02, (bps, q.bps)


def test_quality_at_4bps_e8():
    w = torch.randn(1024, 4096)
    q = encode(w, CodecConfig(bps=4.0, lattice="e8"))
    assert q.bps <= 4.0
    assert snr_db(w, decode(q)) >= 22.4


def test_snr_target_config():
    w = torch.randn(256, 1024)
    q = encode(w, CodecConfig(snr_db=20.0))
    assert abs(snr_db(w, decode(q)) - 20.0) < 0.3


def test_rate_grows_and_quality_follows():
    w = torch.randn(256, 1024)
    snrs = [snr_db(w, decode(encode(w, CodecConfig(bps=b)))) for b in (2, 3, 4, 5, 6)]
    assert all(b > a + 4 for a, b in zip(snrs, snrs[1:]))


def test_heavy_tails_close_to_gaussian():
    t = heavy_tailed(512, 2048)
    gauss = torch.randn(512, 2048, generator=torch.Generator().manual_seed(5))
    cfg = CodecConfig(bps=4.0)
    assert abs(snr_db(t, decode(encode(t, cfg))) - snr_db(gauss, decode(encode(gauss, cfg)))) < 0.5


def test_deterministic_bytes_and_key_dependence():
    w = torch.randn(64, 512)
    a = encode(w, CodecConfig(), key="blk.0").to_bytes()
    assert a == encode(w.clone(), CodecConfig(), key="blk.0").to_bytes()
    assert a != encode(w, CodecConfig(), key="blk.1").to_bytes()


def test_zero_rows_and_constant_tensor():
    w = torch.zeros(4, 64)
    w[1] = 3.0
    q = encode(w, CodecConfig(bps=6.0))
    w_hat = decode(q)
    assert torch.equal(w_hat[0], torch.zeros(64)) and torch.equal(w_hat[2:], torch.zeros(2, 64))
    assert snr_db(w[1:2], w_hat[1:2]) > 20


def test_tiny_tensor_warns_about_overhead():
    with pytest.warns(RateBudgetWarning):
        q = encode(torch.randn(1, 4), CodecConfig(bps=4.0))
    assert q.bps > 4.0  # honest: the header does not fit in 16 bits


@pytest.mark.parametrize("bad,msg", [
    (torch.tensor([[1.0, float("nan")]]), "NaN"),
    (torch.tensor([[1.0, float("inf")]]), "Inf"),
    (torch.empty(0, 4), "empty"),
    (torch.ones(3, 4, dtype=torch.int32), "dtype"),
    (torch.ones(3, 4, dtype=torch.complex64), "dtype"),
])
def test_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg):
        encode(bad, CodecConfig())


def test_scale_out_of_fp16_range_is_explained():
    with pytest.raises(ValueError, match="scale_dtype"):
        encode(torch.full((2, 64), 1e6), CodecConfig())
    q = encode(torch.full((2, 64), 1e6), CodecConfig(scale_dtype="float32"))
    assert torch.isfinite(decode(q)).all()


@pytest.mark.parametrize("kw", [dict(bps=0.1), dict(bps=4, snr_db=20), dict(lattice="e7"), dict(tile=100),
                                dict(block=12), dict(scale_dtype="int8"), dict(coder="ans"), dict(version=9)])
def test_config_validation(kw):
    with pytest.raises(ValueError):
        CodecConfig(**kw)


def test_config_dict_round_trip():
    cfg = CodecConfig(bps=3.5, lattice="d4", tile=128)
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict() | {"_version": 99}
    with pytest.raises(ValueError, match="version"):
        CodecConfig.from_dict(bad)


def test_version_mismatch_and_truncation():
    blob = bytearray(encode(torch.randn(8, 64), CodecConfig()).to_bytes())
    wrong = bytearray(blob)
    wrong[4] = 3  # versions 1 (Rice) and 2 (rANS) are read
    with pytest.raises(HQFormatError, match="version"):
        EncodedTensor.from_bytes(bytes(wrong))
    for cut in (0, 3, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(HQFormatError):
            EncodedTensor.from_bytes(bytes(blob[:cut]))
    with pytest.raises(HQFormatError):
        EncodedTensor.from_bytes(bytes(blob) + b"\0")



def test_short_header_with_valid_crc_is_a_format_error():
    # a blob whose CRC matches but which ends inside the shape/tail fields (8 dims need 32 bytes)
    import struct
    import zlib

    from hq_diffusion.codec.format import _FIXED

    body = _FIXED.pack(b"HQCT", 1, 0, 0, 0, 8, 8, 12, 0) + b"\x01" * 16
    with pytest.raises(HQFormatError, match="truncated"):
        EncodedTensor.from_bytes(body + struct.pack("<I", zlib.crc32(body)))

def test_fuzz_mutated_blobs():
    w = torch.randn(12, 200)
    q = encode(w, CodecConfig(bps=4.0, lattice="d4"))
    blob = q.to_bytes()
    expect = decode(q)
    rng = random.Random(1234)
    outcomes = {"error": 0, "unchanged": 0}
    for i in range(1000):
        b = bytearray(blob)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                j = rng.randrange(len(b))
                b[j] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b = b[: rng.randrange(len(b))]
        elif kind == 2:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            j = rng.randrange(len(b))
            b[j] = rng.randrange(256)
        if bytes(b) == blob:  # a flip undone by a second flip, or a byte overwritten by its own value
            assert torch.equal(decode(EncodedTensor.from_bytes(bytes(b))), expect)
            outcomes["unchanged"] += 1
            continue
        # every real change (flips, truncation, trailing bytes, overwrites) is detected: never a silent decode
        with pytest.raises(HQFormatError):
            EncodedTensor.from_bytes(bytes(b))
        outcomes["error"] += 1
    assert outcomes["error"] >= 990, outcomes


def test_alpha_table_matches_reference_operating_point():
    # the paper's calibration: E8 at 4.0 payload bps has α ≈ 7.306
    assert abs(alpha_for_rate("e8", 4.0) - 7.306) < 0.05
