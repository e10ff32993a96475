"""Bit-stripping and Rice coding: exact round trips, optimal k, bounded and validated decoding."""
import pytest
import torch

from hq_diffusion.codec import HQFormatError
from hq_diffusion.codec.lattice import LATTICES, nearest
from hq_diffusion.codec.rice import ESC, KMAX, RiceStream, coded_bits, decode_stream, encode_stream, stream_bits
from hq_diffusion.codec.strip import strip, stream_lengths, unstrip, unzigzag, zigzag


def test_zigzag_round_trip():
    n = torch.tensor([0, -1, 1, -2, 2, 2**29, -(2**29)], dtype=torch.int32)
    z = zigzag(n)
    assert z[:5].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(unzigzag(z), n)


@pytest.mark.parametrize("lattice", sorted(LATTICES))
@pytest.mark.parametrize("scale", [0.3, 7.0, 300.0])
def test_strip_round_trip(lattice, scale):
    y = nearest(lattice, torch.randn(37, 64) * scale)
    streams = strip(lattice, y)
    assert [s.numel() for s in streams] == stream_lengths(lattice, y.numel())
    assert all(int(s.min()) >= 0 for s in streams)
    assert torch.equal(unstrip(lattice, streams, tuple(y.shape)), y)


def test_e8_strip_removes_one_bit_per_scalar():
    # Under a uniform-ish high-resolution source, Σ log2(symbol range) drops by 8 bits per E8 vector:
    # the stripped symbols of a lattice point are at most half the magnitude of its coordinates.
    y = nearest("e8", torch.randn(4096, 8) * 200)
    (z,) = strip("e8", y)
    mag_y = y.abs().double().clamp_min(1).log2().mean()
    mag_z = (z.double() / 2).clamp_min(1).log2().mean()  # zz doubles magnitudes
    assert abs(float(mag_y - mag_z) - 1.0) < 0.05


@pytest.mark.parametrize("n", [1, 7, 8, 4095, 4096, 4097, 20000])
@pytest.mark.parametrize("kind", ["geom", "zeros", "big", "mixed"])
def test_rice_round_trip(n, kind):
    g = torch.Generator().manual_seed(n)
    if kind == "geom":
        z = torch.distributions.Geometric(0.2).sample((n,)).to(torch.int32)
    elif kind == "zeros":
        z = torch.zeros(n, dtype=torch.int32)
    elif kind == "big":
        z = torch.randint(0, 2**24, (n,), generator=g, dtype=torch.int32)
    else:  # mostly small with rare huge outliers: exercises escapes
        z = torch.randint(0, 4, (n,), generator=g, dtype=torch.int32)
        z[torch.randint(0, n, (max(1, n // 500),), generator=g)] = 2**20
    for block in (8, 64, 4096):
        st = encode_stream(z, block)
        assert torch.equal(decode_stream(st), z)
        assert 8 * (st.unary.numel() + st.rem.numel()) + 32 * st.escapes.numel() <= stream_bits(z, block) + 7


def test_escapes_bound_the_unary_runs():
    z = torch.tensor([0] * 100 + [10**6] + [1] * 100, dtype=torch.int32)
    st = encode_stream(z, 64)
    assert st.escapes.numel() >= 1
    bits = ((st.unary.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    ends = torch.nonzero(bits).squeeze(1)
    assert int(torch.diff(ends).max()) <= ESC + 1


def test_k_is_optimal_per_block():
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randint(0, m, (512,), generator=g, dtype=torch.int32) for m in (1, 3, 40, 900, 70000)])
    st = encode_stream(z, 512)
    lens = torch.full((5,), 512, dtype=torch.int64)
    all_k = torch.stack([coded_bits(z, torch.full((5,), k, dtype=torch.int64), lens, 512) for k in range(KMAX + 1)])
    chosen = coded_bits(z, st.ks.to(torch.int64), lens, 512)
    assert torch.equal(chosen, all_k.min(0).values)


def _corrupt(st, **kw):
    d = dict(n=st.n, block=st.block, **st.tensors())
    d.update(kw)
    return RiceStream(**d)


def test_decoder_rejects_inconsistent_streams():
    z = torch.distributions.Geometric(0.3).sample((1000,)).to(torch.int32)
    st = encode_stream(z, 256)
    extra_one = st.unary.clone()
    extra_one[0] |= 0xFF
    with pytest.raises(HQFormatError):
        decode_stream(_corrupt(st, unary=extra_one))
    with pytest.raises(HQFormatError):  # a run of zeros longer than ESC
        decode_stream(_corrupt(st, unary=torch.cat([torch.zeros(8, dtype=torch.uint8), st.unary])))
    with pytest.raises(HQFormatError):
        decode_stream(_corrupt(st, rem=st.rem[:-1]))
    with pytest.raises(HQFormatError):
        decode_stream(_corrupt(st, escapes=torch.tensor([99], dtype=torch.int32)))
    with pytest.raises(HQFormatError):
        decode_stream(_corrupt(st, ks=torch.full_like(st.ks, KMAX + 1)))
    with pytest.raises(HQFormatError):
        decode_stream(_corrupt(st, offsets=st.offsets + 1))
    with pytest.raises(HQFormatError):
        decode_stream(_corrupt(st, unary=torch.cat([st.unary, torch.zeros(1, dtype=torch.uint8)])))
