"""The compiled lattice pass (codec/lattice_jit.py): the same lattice integers, stripped symbols, rANS counts,
largest |y| and range errors as the torch reference (lattice._nearest_*_torch + strip._strip_torch +
rans.count_symbols), bit for bit — random rows at several α, odd row counts, strided rows, exact ties of every
kind, zeros, huge values — and the same encoded bytes through ``encode`` (Rice and rANS, every lattice) with
the pass on and off."""
from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from hq_diffusion.codec import CodecConfig, _np, core, encode, lattice_jit, rans
from hq_diffusion.codec.errors import HQRangeError
from hq_diffusion.codec.format import rans_contexts
from hq_diffusion.codec.lattice import _nearest_d4_torch, _nearest_e8_torch, nearest_a2, nearest_z
from hq_diffusion.codec.strip import _strip_torch, stream_lengths

LATTICES = ("e8", "d4", "a2", "z")
_REF = {"e8": _nearest_e8_torch, "d4": _nearest_d4_torch, "a2": nearest_a2, "z": nearest_z}


def _reference(u: torch.Tensor, lattice: str, alpha: float):
    """Torch path: (y int32, streams int32, tops, counts) of the rows ``u`` at ``alpha``."""
    y = _REF[lattice](u * alpha)
    zs = [z.to(torch.int32).numpy() for z in _strip_torch(lattice, y)]
    tops, counts = zip(*(rans.count_symbols(z, rans_contexts(lattice, i)) for i, z in enumerate(zs)))
    return y, zs, list(tops), list(counts)


def _assert_same(u: torch.Tensor, lattice: str, alpha: float):
    y, zs, tops, counts = _reference(u, lattice, alpha)
    un = u.numpy()
    outs = [np.full(n, -7, np.int32) for n in stream_lengths(lattice, u.numel())]
    lo, hi = lattice_jit.symbols_into(un, lattice, alpha, outs)
    for i, (got, ref) in enumerate(zip(outs, zs)):
        assert np.array_equal(got, ref), (lattice, alpha, i, np.flatnonzero(got != ref)[:5])
    assert (lo, hi) == (int(y.min()), int(y.max()))
    got_tops, got_counts = lattice_jit.symbol_counts(un, lattice, alpha)
    assert got_tops == tops
    for g, c in zip(got_counts, counts):
        assert g.shape == c.shape and np.array_equal(g, c)


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("rows", [1, 7, 37])
def test_random_rows_match_torch(lattice, rows):
    """Gaussian unit rows (an odd width too) at α from coarse to fine, including α not representable in float32
    (the pass multiplies by float32(α), as torch does)."""
    g = torch.Generator().manual_seed(rows)
    for cols in (8, 264):
        u = torch.randn(rows, cols, generator=g) * 1.3
        for alpha in (0.05, 0.3, 2.0**0.77, 5.1, 40.0, 3000.0):
            _assert_same(u, lattice, alpha)


@pytest.mark.parametrize("lattice", LATTICES)
def test_strided_rows_match(lattice):
    """The rate search passes a strided sample (``u[::stride]``): no copy needed, the same result."""
    u = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    sample = u[::3]
    assert not sample.is_contiguous()
    _assert_same(sample, lattice, 4.2)


def _tie_grid(n: int, dim: int, seed: int, step: float) -> torch.Tensor:
    """Rows of multiples of ``step`` in [−4, 4]: half-integers and integers make rounding ties (half to even),
    equal largest errors (the fix-up's first-argmax rule) and, for E8, points equidistant from the even and
    the odd coset."""
    rng = np.random.default_rng(seed)
    k = int(round(4 / step))
    return torch.from_numpy((rng.integers(-k, k + 1, size=(n, 8 * dim)) * step).astype(np.float32))


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("step", [0.5, 0.25])
def test_exact_ties_match(lattice, step):
    for seed in range(3):
        u = _tie_grid(257, 4, seed + int(8 * step), step)
        for alpha in (1.0, 2.0, 0.5, float(np.sqrt(3.0))):
            _assert_same(u, lattice, alpha)


def test_tie_data_is_sensitive_to_the_tie_rules():
    """The tie grid does exercise the rules: with E8's coset choice taken on ``≤`` instead of ``<``, or the
    fix-up moving the *last* largest error instead of the first, the torch reference itself changes on it; the
    compiled pass follows the real rules (the test above), so a pass that broke a tie differently fails there."""
    v = _tie_grid(2000, 1, 11, 0.5).reshape(-1, 8)
    ref = _nearest_e8_torch(v)
    ye = core_round_fix(v, even=True)
    yo = core_round_fix(v, even=False)
    de = (v - ye).square().sum(-1, keepdim=True)
    do = (v - yo).square().sum(-1, keepdim=True)
    assert torch.equal(torch.where(do < de, yo, ye).to(torch.int32), ref)
    assert not torch.equal(torch.where(do <= de, yo, ye).to(torch.int32), ref)  # coset ties exist
    ye_last = core_round_fix(v, even=True, last=True)
    assert not torch.equal(ye_last, ye)  # equal largest errors with a fix-up exist


def core_round_fix(v: torch.Tensor, even: bool, last: bool = False) -> torch.Tensor:
    """One E8 candidate as the torch reference computes it; ``last`` takes the last largest error instead."""
    y = 2.0 * torch.round(v * 0.5) if even else 2.0 * torch.round((v - 1.0) * 0.5) + 1.0
    err = v - y
    bad = (torch.remainder(y.sum(-1), 4.0) != 0).unsqueeze(-1)
    a = err.abs()
    idx = (7 - a.flip(-1).argmax(-1, keepdim=True)) if last else a.argmax(-1, keepdim=True)
    step = torch.where(err.gather(-1, idx) >= 0, 2.0, -2.0)
    return y.scatter_add(-1, idx, torch.where(bad, step, torch.zeros_like(step)))


@pytest.mark.parametrize("lattice", LATTICES)
def test_zeros_and_zero_rows(lattice):
    u = torch.randn(9, 48, generator=torch.Generator().manual_seed(2))
    u[3] = 0.0
    u[5, :8] = -0.0
    _assert_same(u, lattice, 3.0)
    _assert_same(torch.zeros(4, 16), lattice, 3.0)


@pytest.mark.parametrize("lattice", LATTICES)
def test_large_codes_match_and_raise_the_same_range_error(lattice, monkeypatch):
    """Integers past the format's 2**27 limit: the same symbols and counts (int32 arithmetic throughout), and
    ``_symbol_streams`` raises the same HQRangeError (the same largest |y|, the same first row block) on both
    paths; an α outside the format's range too."""
    u = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    u[17, 9] = 30.0
    _assert_same(u, lattice, 2.0**23)  # |y| up to ~2.5e8 < 2**31
    monkeypatch.setattr(core, "_BLOCK_ELEMS", 8 * 64)  # several row blocks: the error names the first bad one
    msgs = []
    for impl in ("numpy", "compiled"):
        monkeypatch.setattr(_np, "CPU_IMPL", impl)
        for alpha in (2.0**23, 2.0**25):
            with pytest.raises(HQRangeError) as ei:
                core._symbol_streams(u, lattice, alpha, "tensor 'w'")
            msgs.append(str(ei.value))
    assert msgs[:2] == msgs[2:] and "lattice integers reach" in msgs[0] and "alpha" in msgs[1]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="float→int32 overflow is x86's")
@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_beyond_int32_matches_x86_conversion(lattice):
    """Rounded values past the int32 range convert to −2**31, as numpy's and torch's conversion do on x86; the
    symbols follow int32 wrap-around. The count pass reports the negative symbols this makes (ValueError,
    like rans.count_symbols) and ``_lattice_point`` reports the integers as 2**31 (not a wrapped abs())."""
    u = torch.zeros(2, 16)
    u[0, 3], u[1, 10] = 4.0e9, -3.0e9
    y = _REF[lattice](u * 1.0)
    zs = [z.to(torch.int32).numpy() for z in _strip_torch(lattice, y)]
    outs = [np.empty(n, np.int32) for n in stream_lengths(lattice, u.numel())]
    lo, hi = lattice_jit.symbols_into(u.numpy(), lattice, 1.0, outs)
    assert (lo, hi) == (int(y.min()), int(y.max())) and lo == -(2**31)
    assert all(np.array_equal(a, b) for a, b in zip(outs, zs))
    if min(int(z.min()) for z in zs) < 0:
        with pytest.raises(ValueError):
            lattice_jit.symbol_counts(u.numpy(), lattice, 1.0)
    with pytest.raises(HQRangeError, match="reach 2147483648 >"):
        core._lattice_point(u, lattice, 1.0, "tensor 'w'")


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="float32 rows"):
        lattice_jit.symbol_counts(np.zeros((2, 12), np.float32), "e8", 1.0)
    with pytest.raises(ValueError, match="float32 rows"):
        lattice_jit.symbol_counts(np.zeros((2, 16), np.float64), "e8", 1.0)
    with pytest.raises(ValueError, match="int32 arrays of lengths"):
        lattice_jit.symbols_into(np.zeros((2, 16), np.float32), "d4", 1.0, [np.empty(24, np.int32)])
    with pytest.raises(ValueError, match="unknown lattice"):
        lattice_jit.symbol_counts(np.zeros((2, 16), np.float32), "e7", 1.0)


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("coder", ["rice", "rans"])
def test_encode_bytes_unchanged(lattice, coder, monkeypatch):
    """The whole encode (rate search, model passes, every trial build; several row blocks) gives the same blob
    with the compiled pass and with the torch/numpy path; ``observe`` still sees the lattice integers."""
    w = torch.randn(40, 777, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    cfg = CodecConfig(bps=4.0, lattice=lattice, coder=coder, block=64)
    monkeypatch.setattr(core, "_BLOCK_ELEMS", 8 * 784)
    got = encode(w, cfg, key="jit").to_bytes()
    seen = []
    ref = encode(w, cfg, key="jit", observe=lambda a, sl, y, s: seen.append((a, sl.start, y.shape))).to_bytes()
    assert got == ref and seen
    monkeypatch.setattr(core, "_compiled_pass", lambda t: None)
    assert encode(w, cfg, key="jit").to_bytes() == got


def test_the_pass_is_chosen_with_the_coder(monkeypatch):
    """CPU tensors take the compiled pass unless ``CPU_IMPL = "numpy"``; no silent fallback."""
    u = torch.zeros(2, 8)
    assert core._compiled_pass(u) is lattice_jit
    monkeypatch.setattr(_np, "CPU_IMPL", "numpy")
    assert core._compiled_pass(u) is None
