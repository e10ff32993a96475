"""The fast CPU paths of the codec (numpy, chunked) against general paths and the former torch code.

Every fast path must give bit-identical results: the same lattice integers (tie-breaking included),
the same symbols and the same bytes. The reference is the former torch implementation, which the
modules keep verbatim for tensors on other devices (``_*_torch``); here it runs on CPU tensors.
"""

import numpy as np
import pytest
import torch

from hq_diffusion.codec import lattice, rice, strip
from hq_diffusion.codec.errors import HQFormatError

# ---- the reference: the former torch code, kept in the modules for non-CPU tensors --------------

ref_nearest_e8 = lattice._nearest_e8_torch
ref_nearest_d4 = lattice._nearest_d4_torch
ref_choose_k = rice._choose_k_torch


def ref_strip_e8(y):
    return strip._strip_torch("e8", y)[0]


def ref_unstrip_e8(z, shape):
    return strip._unstrip_torch("e8", [z], shape)


# ---- inputs -----------------------------------------------------------------------------------


def _tie_inputs(rows, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    shp = (rows, dim)
    yield torch.randn(shp, generator=g) * 7.3
    yield torch.randint(-9, 10, shp, generator=g).float()  # exact integers
    yield torch.randint(-9, 10, shp, generator=g).float() + 0.5  # half-integers
    yield torch.randint(-16, 17, shp, generator=g).float() * 0.25
    yield (torch.randint(-6, 7, shp, generator=g) + 0.5) + torch.randn(shp, generator=g) * 1e-6
    yield torch.randn(shp, generator=g) * 1e-8  # tiny: rounding of v − 1
    yield torch.zeros(shp)
    yield -torch.zeros(shp)
    yield torch.randn(shp, generator=g) * 1e4
    x = torch.randn(shp, generator=g) * 3  # equal |errors| in one vector: argmax ties
    x[:, 1::dim] = x[:, 0::dim]
    x[:, 2::dim] = -x[:, 0::dim]
    yield x


def _streams(seed=0):
    """Symbol streams of odd sizes: geometric, zeros, escapes, per-block magnitudes (many distinct k)."""
    g = torch.Generator().manual_seed(seed)
    for n in (1, 7, 9, 100, 4095, 20001):
        yield ((1 - torch.rand(n, generator=g)).log() * -3.0).floor().to(torch.int32)
        yield torch.zeros(n, dtype=torch.int32)
        e = ((1 - torch.rand(n, generator=g)).log() * -2.0).floor().to(torch.int32)
        e[::37] = 5000
        yield e
        mag = 2.0 ** (torch.arange(n) // 64 % 26).float()
        yield (torch.rand(n, generator=g) * mag).to(torch.int32)
    yield torch.randint(0, 2**31 - 1, (1000,), generator=g, dtype=torch.int32)


# ---- lattices ---------------------------------------------------------------------------------


def test_nearest_e8_d4_match_torch_reference():
    for i, v in enumerate(_tie_inputs(3000, 64)):
        assert torch.equal(lattice.nearest_e8(v), ref_nearest_e8(v)), i
        assert torch.equal(lattice.nearest_d4(v), ref_nearest_d4(v)), i
    for shp in ((1, 8), (3, 8), (5, 24)):
        v = torch.randn(shp) * 5
        assert torch.equal(lattice.nearest_e8(v), ref_nearest_e8(v))


def test_nearest_chunking_does_not_matter(monkeypatch):
    v = torch.randn(1000, 64) * 6
    full = lattice.nearest_e8(v), lattice.nearest_d4(v)
    monkeypatch.setattr(lattice, "CHUNK", 24)  # many chunks, a ragged last one
    assert torch.equal(lattice.nearest_e8(v), full[0])
    assert torch.equal(lattice.nearest_d4(v), full[1])


# ---- stripping --------------------------------------------------------------------------------


def test_strip_e8_matches_torch_reference(monkeypatch):
    g = torch.Generator().manual_seed(1)
    ys = [lattice.nearest_e8(torch.randn(700, 32, generator=g) * 9),
          torch.randint(-300, 300, (700, 32), generator=g, dtype=torch.int32)]  # not lattice points
    for chunk in (strip.CHUNK, 40):
        monkeypatch.setattr(strip, "CHUNK", chunk)
        for y in ys:
            z = strip.strip("e8", y)[0]
            assert z.dtype == torch.int32 and torch.equal(z, ref_strip_e8(y))
            assert torch.equal(strip.unstrip("e8", [z], y.shape), ref_unstrip_e8(z, y.shape))
        zr = torch.randint(0, 2**31 - 1, (700 * 32,), generator=g, dtype=torch.int32)
        assert torch.equal(strip.unstrip("e8", [zr], (700, 32)), ref_unstrip_e8(zr, (700, 32)))


@pytest.mark.parametrize("name", ["e8", "d4", "a2", "z"])
def test_strip_matches_torch_path(name):
    y = lattice.nearest(name, torch.randn(33, 48) * 11)
    for a, b in zip(strip.strip(name, y), strip._strip_torch(name, y)):
        assert torch.equal(a, b.to(torch.int32))  # the torch path's d4 stream 1 is int64, same values
    zs = strip.strip(name, y)
    assert torch.equal(strip.unstrip(name, zs, y.shape), strip._unstrip_torch(name, zs, y.shape))


@pytest.mark.parametrize("name", ["e8", "d4", "a2", "z"])
def test_strip_roundtrip(name):
    y = lattice.nearest(name, torch.randn(33, 48) * 11)
    zs = strip.strip(name, y)
    assert all(z.dtype == torch.int32 and int(z.min()) >= 0 for z in zs)
    assert torch.equal(strip.unstrip(name, zs, y.shape), y)


# ---- Rice -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(1, rice.KMAX + 1))
def test_packers_fast_vs_general(k):
    rng = np.random.default_rng(k)
    for m in (8, 64, 8 * 1001):
        v = rng.integers(0, 2**31 - 1, m).astype(np.int32)
        b = rice._pack(v, k)
        assert b.size == m * k // 8
        assert np.array_equal(b, rice._pack(v, k, general=True))  # SWAR / bit matrix instead of k | 8
        assert np.array_equal(b, rice._pack_wide(v, k))  # bit matrix for every k
        low = v.astype(np.int64) & ((1 << k) - 1)
        assert np.array_equal(rice._unpack(b, k).astype(np.int64), low)
        assert np.array_equal(rice._unpack(b, k, general=True).astype(np.int64), low)
        assert np.array_equal(rice._unpack_wide(b, k).astype(np.int64), low)


def test_streams_match_torch_path():
    for z in _streams(4):
        for block in (8, 64, 4096):
            st, ref = rice.encode_stream(z, block), rice._encode_stream_torch(z, block)
            for key, t in st.tensors().items():
                assert torch.equal(t, ref.tensors()[key]), key
            assert torch.equal(rice.decode_stream(st), rice._decode_stream_torch(st))


def test_choose_k_matches_torch_reference():
    for z in _streams():
        for block in (8, 64, 4096):
            ks, bits = rice.choose_k(z, z.numel(), block)
            rk, rb = ref_choose_k(z, z.numel(), block)
            assert torch.equal(ks, rk) and torch.equal(bits, rb)


def _encode_both_ways(z, block, monkeypatch):
    fast = rice.encode_stream(z, block)
    with monkeypatch.context() as m:
        m.setattr(rice, "_uniform", lambda ks: False)  # per-block paths even when all k are equal
        m.setattr(rice, "_CHUNK_SYMBOLS", 64)  # many chunks in every loop
        general = rice.encode_stream(z, block)
        for key, t in fast.tensors().items():
            assert torch.equal(t, general.tensors()[key]), key
        assert torch.equal(rice.decode_stream(fast), z)
    return fast


def test_uniform_k_and_chunked_paths_match_general(monkeypatch):
    g = torch.Generator().manual_seed(2)
    for n in (1, 13, 1000, 4099, 30011):
        for scale in (0.3, 3.0, 40.0):  # k = 0, a small k, a larger k
            z = ((1 - torch.rand(n, generator=g)).log() * -scale).floor().to(torch.int32)
            for block in (8, 64, 512):
                st = _encode_both_ways(z, block, monkeypatch)
                assert torch.equal(rice.decode_stream(st), z)
    for z in _streams(3):  # mixed k, escapes
        _encode_both_ways(z, 64, monkeypatch)


def test_stream_stats_match_stream():
    g = torch.Generator().manual_seed(5)
    z = ((1 - torch.rand(50000, generator=g)).log() * -4.0).floor().to(torch.int32)
    z[::101] = 10**6  # escapes
    st = rice.encode_stream(z, 512)
    ks, bits = rice.choose_k(z, z.numel(), 512)
    assert torch.equal(st.ks, ks.to(torch.uint8))
    assert 8 * st.unary.numel() - int(bits.sum()) + 8 * st.rem.numel() + 32 * st.escapes.numel() in range(8)
    assert torch.equal(rice.decode_stream(st), z)


def test_invalid_symbols_are_rejected():
    """A log(0) = -inf cast to int32 once reached the coder as -2**31; it must be refused, not overflow."""
    for bad in (torch.tensor([3, -1, 2], dtype=torch.int32), torch.tensor([0, -2**31], dtype=torch.int32),
                torch.tensor([1, 2**31], dtype=torch.int64)):
        with pytest.raises(ValueError, match="non-negative|int32"):
            rice.encode_stream(bad, 8)
    with pytest.raises(TypeError, match="integers"):
        rice.encode_stream(torch.ones(4), 8)


def test_corrupt_streams_are_rejected():
    g = torch.Generator().manual_seed(6)
    z = ((1 - torch.rand(5000, generator=g)).log() * -3.0).floor().to(torch.int32)
    z[7] = 10**6
    st = rice.encode_stream(z, 512)

    def mutated(**kw):
        t = {k: v.clone() for k, v in st.tensors().items()}
        t.update(kw)
        return rice.RiceStream(st.n, st.block, t["ks"], t["offsets"], t["unary"], t["rem"], t["escapes"])

    flipped = st.unary.clone()
    flipped[100] ^= 4
    bad = [mutated(unary=flipped), mutated(unary=torch.cat([st.unary, torch.ones(1, dtype=torch.uint8)])),
           mutated(offsets=st.offsets + 1), mutated(escapes=st.escapes[:0]), mutated(rem=st.rem[:-1]),
           mutated(ks=torch.full_like(st.ks, 25))]
    for s in bad:
        with pytest.raises(HQFormatError) as fast:
            rice.decode_stream(s)
        with pytest.raises(HQFormatError) as ref:
            rice._decode_stream_torch(s)
        assert str(fast.value) == str(ref.value)  # same check fires first


def test_implementation_is_chosen_in_one_place():
    """Only ``_np.select`` looks at a device to choose between the numpy and the torch implementations."""
    import inspect

    for mod in (lattice, rice, strip):
        assert "device.type" not in inspect.getsource(mod), mod.__name__


def test_bench_speed_times_two_coders_side_by_side(capsys):
    """``bench speed --coder rice,rans``: one row per coder in one run; an unknown coder is a usage error."""
    from hq_diffusion.bench import speed

    assert speed.main(["--rows", "16", "--cols", "256", "--repeat", "1", "--coder", "rice,rans"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| E8 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["rice", "rans"]
    with pytest.raises(SystemExit):
        speed.main(["--rows", "16", "--cols", "256", "--coder", "rice,ans"])
