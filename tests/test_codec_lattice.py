"""Nearest-point quantizers against brute force, lattice membership and the analytic Voronoi MSE."""
import functools
import math

import pytest
import torch

from hq_diffusion.codec.lattice import LATTICES, is_member, nearest, to_physical


@functools.lru_cache(maxsize=None)
def _offsets(dim):
    if dim == 1:
        return torch.arange(-2, 4).unsqueeze(1)
    return torch.cartesian_prod(*[torch.arange(-2, 4)] * dim)


def _brute_force(lattice, v):
    """Exhaustive nearest point: every integer vector within ±2 (±3 for a2's first axis) of v."""
    dim = LATTICES[lattice].dim
    out = []
    for vec in v.reshape(-1, dim):
        if lattice == "a2":
            centre = torch.stack([vec[0] / 3**0.5, vec[1]]).floor().long()
        else:
            centre = vec.floor().long()
        cands = _offsets(dim) + centre
        cands = cands[is_member(lattice, cands).squeeze(-1)]
        d = (to_physical(lattice, cands) - vec).square().sum(1)
        out.append(cands[d.argmin()])
    return torch.stack(out)


def _dist(lattice, v, y):
    return (to_physical(lattice, y.reshape(-1, LATTICES[lattice].dim)) - v.reshape(-1, LATTICES[lattice].dim)).square().sum(1)


@pytest.mark.parametrize("lattice", sorted(LATTICES))
def test_nearest_matches_brute_force(lattice):
    dim = LATTICES[lattice].dim
    g = torch.Generator().manual_seed(1)
    count = 12 if lattice == "e8" else 300
    v = torch.randn(count, dim, generator=g) * 3
    y = nearest(lattice, v)
    assert is_member(lattice, y).all()
    ref = _brute_force(lattice, v)
    # same distance as the exhaustive search (ties may pick a different, equally near point)
    assert torch.allclose(_dist(lattice, v, y), _dist(lattice, v, ref), atol=1e-5)


@pytest.mark.parametrize("lattice", sorted(LATTICES))
def test_voronoi_mse_at_high_resolution(lattice):
    info = LATTICES[lattice]
    g = torch.Generator().manual_seed(2)
    v = torch.rand(400_000 // info.dim * info.dim, generator=g) * 1000 - 500
    y = nearest(lattice, v)
    mse = (to_physical(lattice, y) - v).double().square().sum() / (v.numel() / info.dim)
    assert abs(float(mse) / info.voronoi_mse - 1) < 0.01


@pytest.mark.parametrize("lattice", sorted(LATTICES))
def test_nearest_on_lattice_points_and_ties(lattice):
    dim = LATTICES[lattice].dim
    # exact lattice points map to themselves
    pts = nearest(lattice, torch.randn(64, dim) * 5)
    assert torch.equal(nearest(lattice, to_physical(lattice, pts)), pts)
    # zeros and half-integers: still lattice points, deterministic
    for v in (torch.zeros(8, dim), torch.full((8, dim), 0.5), torch.full((8, dim), -1.0)):
        y = nearest(lattice, v)
        assert is_member(lattice, y).all()
        assert torch.equal(y, nearest(lattice, v.clone()))


# Closed forms, independent of the code: per-vector MSE of the Voronoi cell = n · G · V^(2/n), with G the
# normalized second moment (Conway & Sloane, SPLAG ch. 21) and V the cell volume of the integer form the codec
# uses: 2·E8 (V = 2^8), 2·D4 (det D4 = 2, so V = 2·2^4), the hexagonal lattice of minimum distance 2
# (V = 2√3), Z (V = 1).
_G = {"e8": 929 / 12960, "d4": 13 / (120 * math.sqrt(2)), "a2": 5 / (36 * math.sqrt(3)), "z": 1 / 12}
_VOLUME = {"e8": 2.0**8, "d4": 2.0 * 2**4, "a2": 2 * math.sqrt(3), "z": 1.0}


@pytest.mark.parametrize("lattice", sorted(LATTICES))
def test_constants_match_the_closed_forms(lattice):
    info = LATTICES[lattice]
    n = info.dim
    exact = n * _G[lattice] * _VOLUME[lattice] ** (2 / n)
    assert info.G == pytest.approx(_G[lattice], rel=1e-12)
    assert info.voronoi_mse == pytest.approx(exact, rel=1e-12)
    assert info.shannon_gap_db == pytest.approx(10 * math.log10(2 * math.pi * math.e * _G[lattice]), abs=0.006)


def test_constants_exact_values():
    assert LATTICES["e8"].voronoi_mse == pytest.approx(32 * 929 / 12960, rel=1e-12)  # 2.29383, not 2.2930
    assert LATTICES["d4"].voronoi_mse == pytest.approx(26 / 15, rel=1e-12)
    assert LATTICES["a2"].voronoi_mse == pytest.approx(5 / 9, rel=1e-12)
    assert LATTICES["z"].voronoi_mse == pytest.approx(1 / 12, rel=1e-12)


def test_cell_volumes_by_counting_lattice_points():
    """V of the integer form, independently of the closed forms: count lattice points in a big box."""
    for lattice, side in (("e8", 2), ("d4", 8), ("a2", 40), ("z", 40)):  # 4·Z^n ⊂ the integer forms
        n = LATTICES[lattice].dim
        if lattice == "a2":  # integer form (a, b) -> (√3·a, b): points per physical box of sides 2√3·m, 2·m
            pts = torch.cartesian_prod(torch.arange(-side, side), torch.arange(-side, side))
            inside = is_member(lattice, pts).squeeze(-1).sum()
            volume = (2 * side * math.sqrt(3)) * (2 * side) / float(inside)
        else:
            axes = [torch.arange(-side, side)] * n
            pts = torch.cartesian_prod(*axes).reshape(-1, n)
            inside = is_member(lattice, pts).squeeze(-1).sum()
            volume = (2 * side) ** n / float(inside)
        assert volume == pytest.approx(_VOLUME[lattice], rel=1e-9), lattice
