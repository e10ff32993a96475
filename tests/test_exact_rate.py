"""Exact rate of the Rice coder: a bps target lands in (bps − 0.001, bps] total bits per scalar.

Issue 13 asks for the requested rate within 0.001 from below, with no fixed undershoot. ``total_bits`` is every
stored bit (header, row scales, per-block k and offsets, payload, escapes, CRC). The former Rice search aimed
0.004 below the target on sampled tensors (4096² E8 at 4 bps: 3.9961) and stopped anywhere in 0.003 of its
aim on small ones; these tests fail on it (600×4096 E8 at 4 bps: 3.9964). The rANS coder has its own tests
(tests/test_codec_rans.py).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hq_diffusion.codec import CodecConfig, decode, encode
from hq_diffusion.codec import core
from hq_diffusion.codec.core import RateBudgetWarning

LATTICES = ("e8", "d4", "a2", "z")
RATES = (3.0, 4.0, 5.0)
SMALL, SAMPLED, ODD = (256, 1024), (600, 4096), (1000, 777)


def _gauss(shape, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.fixture(scope="module")
def weights():
    return {s: _gauss(s) for s in (SMALL, SAMPLED, ODD)}


def test_the_cases_cover_both_alpha_searches():
    """SMALL and ODD fit in α's sample (the whole tensor is searched); SAMPLED does not (a row subsample)."""
    for shape, sampled in ((SMALL, False), (ODD, False), (SAMPLED, True)):
        n_pad = core.plan_tiles(shape[1], CodecConfig().tile)[1]
        assert (shape[0] * n_pad > core._SAMPLE_SYMBOLS) is sampled, shape


@pytest.mark.parametrize("bps", RATES)
@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("shape", [SMALL, SAMPLED, ODD], ids=["256x1024", "600x4096-sampled", "1000x777"])
def test_rice_lands_within_a_thousandth_below(weights, shape, lattice, bps):
    w = weights[shape]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RateBudgetWarning)
        q = encode(w, CodecConfig(bps=bps, lattice=lattice, coder="rice"), key="layer")
    assert q.coder == "rice"
    total = q.total_bits / w.numel()
    assert q.total_bits == 8 * len(q.to_bytes())  # the rate counts every stored bit
    assert bps - 0.001 < total <= bps, (shape, lattice, bps, total)
    r = decode(q)  # and it is a real encode of w: its SNR is the lattice's at about this rate
    snr = 10 * math.log10(float(w.square().sum()) / float((w - r).square().sum()))
    assert 6.02 * bps - 3.5 < snr < 6.02 * bps, snr


def test_sampled_encode_makes_at_most_one_extra_whole_tensor_pass(weights, monkeypatch):
    """The rate search may add one whole-tensor pass (lattice points and symbols) to the one encode."""
    w = weights[SAMPLED]
    n = {"pass": 0}
    orig = core._symbol_streams

    def counted(u, *a, **k):
        n["pass"] += 1
        return orig(u, *a, **k)

    monkeypatch.setattr(core, "_symbol_streams", counted)
    for bps in RATES:
        n["pass"] = 0
        q = encode(w, CodecConfig(bps=bps, lattice="e8", coder="rice"), key="layer")
        assert bps - 0.001 < q.bps <= bps
        assert n["pass"] <= 2, (bps, n)


def test_observe_names_the_kept_attempt(weights):
    """``observe`` sees every coding attempt; the result's α is one of them and its integers are the result's."""
    w = weights[SMALL]
    seen = {}

    def observe(alpha, rows, y, scales):
        seen.setdefault(alpha, []).append((rows, y.clone()))

    q = encode(w, CodecConfig(bps=4.0, lattice="d4", coder="rice"), key="layer", observe=observe)
    assert q.alpha in seen
    y = torch.cat([b for _, b in seen[q.alpha]])
    assert torch.equal(y.reshape(-1), decode(q, out="codes").reshape(-1).to(torch.int32))
    assert q.meta["max_abs_code"] == int(y.abs().max())


def test_all_zero_tensor_keeps_alpha_at_the_range_end():
    from hq_diffusion.codec.format import ALPHA_RANGE

    for shape in (SMALL, SAMPLED):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RateBudgetWarning)  # as before: no warning, nothing to spend
            q = encode(torch.zeros(shape), CodecConfig(bps=4.0, coder="rice"), key="z")
        assert q.alpha == pytest.approx(ALPHA_RANGE[1], rel=1e-6)
        assert q.bps <= 4.0 and torch.count_nonzero(decode(q)) == 0


def test_zero_rows_still_land(weights):
    w = weights[SAMPLED].clone()
    w[::3] = 0.0  # a third of the rows are zero
    q = encode(w, CodecConfig(bps=4.0, lattice="e8", coder="rice"), key="layer")
    assert 4.0 - 0.001 < q.bps <= 4.0
    assert torch.count_nonzero(decode(q)[::3]) == 0


def test_tiny_tensor_still_warns_and_keeps_the_former_encode():
    """Below its fixed overhead a tensor gets the RateBudgetWarning encode, as before (golden fixtures)."""
    with pytest.warns(RateBudgetWarning, match="too small"):
        q = encode(_gauss((4, 8)), CodecConfig(bps=3.0, coder="rice"), key="t")
    assert q.bps > 3.0


@pytest.mark.parametrize("seed", [0, 1])
def test_too_small_sampled_tensor_keeps_its_payload_under_the_rate(seed):
    """Below its fixed overhead a tensor spends bps on the payload alone (the warning says so). When α is refined
    on a row sample -- a tall, narrow weight: 400000×3 pads to rows of 8, 3.2M coordinates -- it aims 0.004
    under, so that the sample's error cannot carry the whole payload over bps: it lands in [bps − 0.008,
    bps − 0.001] bits per padded coordinate (3.9961–3.9967 here; without the margin 4.0010 and 3.9999)."""
    w = _gauss((400000, 3), seed)
    with pytest.warns(RateBudgetWarning, match="too small"):
        q = encode(w, CodecConfig(bps=4.0, coder="rice"), key="tall")
    fixed = core._fixed_bits(tuple(w.shape), w.shape[0], "e8", q.n_pad, q.block,
                             q.scales.numel() * q.scales.element_size())
    payload = (q.total_bits - fixed) / (w.shape[0] * q.n_pad)
    assert 4.0 - 0.008 <= payload <= 4.0 - 0.001, payload


def test_unmet_budget_warns(monkeypatch, weights):
    """When no attempt fits the budget the encoder says so (here: every coded size is forced over it)."""
    orig = core.EncodedTensor.total_bits
    monkeypatch.setattr(core.EncodedTensor, "total_bits", property(lambda s: orig.fget(s) + 10**9))
    with pytest.warns(RateBudgetWarning, match="could not meet"):
        encode(weights[SMALL], CodecConfig(bps=4.0, coder="rice"), key="layer")


def test_a_miss_below_the_window_warns(monkeypatch, weights):
    """A result more than 0.001 under the target is not silent: here the search gets one attempt from an α
    a tenth too low."""
    orig = core._refine_alpha
    monkeypatch.setattr(core, "_refine_alpha", lambda *a: 0.9 * orig(*a))
    monkeypatch.setattr(core, "_MAX_SIZES", 1)
    with pytest.warns(RateBudgetWarning, match="under the requested 4.0 bps"):
        q = encode(weights[SMALL], CodecConfig(bps=4.0, coder="rice"), key="layer")
    assert q.bps <= 4.0 - 0.001


@pytest.mark.parametrize("lattice", LATTICES)
@pytest.mark.parametrize("bps", [2.0, 4.5])
def test_stored_bits_is_the_coded_size(lattice, bps):
    """The search measures sizes without coding them (``_stored_bits``): they must be the coded size, bit for
    bit, else a size in the window could code outside it."""
    w = _gauss((96, 300), seed=3)
    w[5] = 0.0
    cfg = CodecConfig(bps=bps, lattice=lattice, coder="rice")
    q = encode(w, cfg, key="k")
    ur = core._UnitRows(w, cfg, "k", "w")
    syms, _ = core._symbol_streams(ur, lattice, q.alpha, "w")
    fixed = core._fixed_bits(w.shape, 96, lattice, ur.shape[1], cfg.block, ur.scales.numel() * ur.scales.element_size())
    assert core._stored_bits(syms, cfg.block, fixed) == q.total_bits
