"""Nearest-point quantizers against brute force, lattice membership and the analytic Voronoi MSE."""
import functools

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


def test_constants():
    assert LATTICES["e8"].voronoi_mse == pytest.approx(2.2930, abs=1e-3)
    assert LATTICES["d4"].voronoi_mse == pytest.approx(1.7333, abs=1e-3)
    assert LATTICES["a2"].voronoi_mse == pytest.approx(5 / 9)
    assert LATTICES["z"].voronoi_mse == pytest.approx(1 / 12)
