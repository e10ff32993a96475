"""RHT signs (counter-based hash) and the transform itself, against brute-force references."""
import math
import random

import pytest
import torch

from hq_diffusion.bench.tails import heavy_tailed
from hq_diffusion.codec import hashing
from hq_diffusion.codec.rht import excess_kurtosis, fwht, inverse_rht, plan_tiles, rht


def test_mix32_matches_python_reference():
    rng = random.Random(0)
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + [rng.randrange(2**32) for _ in range(2000)]
    got = hashing.mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [hashing.mix32_int(x) for x in xs]


def _lowbias32(x: int) -> int:
    """lowbias32 (C. Wellons' hash-prospector finalizer), written here from its published definition: the
    constants are literals, not the codec's, so a consistent change of them in the codec fails."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_mix32_matches_an_independent_lowbias32():
    rng = random.Random(1)
    xs = [0, 1, 2**31, 2**32 - 1] + [rng.randrange(2**32) for _ in range(500)]
    assert hashing.mix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [_lowbias32(x) for x in xs]


def test_hash_and_signs_golden_values():
    """Frozen outputs (the RHT signs every saved checkpoint was encoded with): a change here is a format change."""
    assert [hashing.mix32_int(x) for x in (0, 1, 12345, 2**31, 2**32 - 1)] == [
        0, 1753845952, 2435775735, 3427483940, 1734902346]
    assert hashing.key_to_u32("blocks.0.attn.to_q") == 1105852652  # CRC-32 of the UTF-8 name
    assert hashing.stream_base(1, "blocks.0.attn.to_q") == 1779498103
    assert hashing.stream_base(0, 0) == 2926543089
    bits = lambda s: "".join("1" if v > 0 else "0" for v in s.tolist())  # noqa: E731
    assert bits(hashing.rht_signs(64, 1, "blocks.0.attn.to_q")) == (
        "1011011000111000100100001100101011000100010001011100100010011111")
    assert bits(hashing.rht_signs(64, 0, 7)) == "1100100011000101110111011010110001011000011101010101010101110110"


def test_signs_deterministic_and_key_dependent():
    a = hashing.rht_signs(4096, seed=1, key="blocks.0.attn.to_q")
    assert torch.equal(a, hashing.rht_signs(4096, seed=1, key="blocks.0.attn.to_q"))
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(a.mean())) < 0.05
    b = hashing.rht_signs(4096, seed=1, key="blocks.0.attn.to_k")
    c = hashing.rht_signs(4096, seed=2, key="blocks.0.attn.to_q")
    assert (a != b).float().mean() > 0.4 and (a != c).float().mean() > 0.4
    # a prefix of a longer vector is the shorter vector: signs depend on the column only
    assert torch.equal(hashing.rht_signs(100, 1, 7), hashing.rht_signs(4096, 1, 7)[:100])


def _sylvester(h):
    m = torch.ones(1, 1, dtype=torch.float64)
    while m.shape[0] < h:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    return m


@pytest.mark.parametrize("h", [8, 64, 256, 512, 2048])
def test_rht_matches_dense_matrix(h):
    n = 2 * h
    x = torch.randn(5, n, dtype=torch.float64)
    d = hashing.rht_signs(n, 3, "k").double()
    dense = torch.block_diag(*[_sylvester(h)] * 2) / math.sqrt(h)
    ref = (x * d) @ dense.T
    got = rht(x.float(), 3, "k", h).double()
    assert torch.allclose(got, ref, atol=1e-4 * math.sqrt(h))
    back = inverse_rht(got.float(), 3, "k", h).double()
    assert torch.allclose(back, x, atol=1e-4)


def test_fwht_is_orthogonal_up_to_scale():
    x = torch.randn(3, 1024)
    y = fwht(x, 1024) / 32.0
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)


@pytest.mark.parametrize("n,tile,expect", [
    (4096, 256, (256, 4096)), (3072, 256, (256, 3072)), (5120, 256, (256, 5120)), (96, 256, (32, 96)),
    (1000, 256, (8, 1000)), (7, 256, (8, 8)), (1, 256, (8, 8)), (24, 256, (8, 24)), (4096, 128, (128, 4096)),
    (2048 * 3, 2048, (2048, 6144)),
])
def test_plan_tiles(n, tile, expect):
    assert plan_tiles(n, tile) == expect


def test_plan_tiles_rejects_bad_input():
    with pytest.raises(ValueError):
        plan_tiles(0, 256)
    with pytest.raises(ValueError):
        plan_tiles(10, 100)


def test_rht_kills_outlier_columns():
    w = heavy_tailed(512, 2048)
    before = excess_kurtosis(w)
    after = excess_kurtosis(rht(w, 0, 0, 256))
    assert before > 100 and after < 2.0  # a scale mixture across tiles keeps a little
