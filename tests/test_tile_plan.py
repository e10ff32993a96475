"""The RHT tile plan for any row width: padding bound, self-reproduction, legacy blobs, SNR on odd widths,
and the Triton kernels / HQLinear paths on odd widths (under ``TRITON_INTERPRET=1`` in a child process, like
tests/test_kernels.py)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from hq_diffusion.codec import CodecConfig, EncodedTensor, HQFormatError, decode, encode
from hq_diffusion.codec import core as codec_core
from hq_diffusion.codec.split import decode_split, encode_split, split_bits
from hq_diffusion.codec.rht import ALLOWED_TILES, PAD_FRACTION, legacy_plan_tiles, plan_tiles
from hq_diffusion.kernels import dispatch
from hq_diffusion.nn.linear import HQLinear, validate_meta

from test_kernels import triton_side  # noqa: F401  (the fixture: Triton on the GPU or in the interpreter)

ODD_WIDTHS = (777, 1000, 333, 4095)
pytestmark = pytest.mark.filterwarnings("error:HQ_KERNELS=triton:RuntimeWarning")


def _slack(n: int) -> int:
    return max(-(-n // 8) * 8 - n, int(n * PAD_FRACTION))


@pytest.mark.parametrize("max_tile", ALLOWED_TILES)
def test_plan_bounds_padding_and_reproduces_itself(max_tile):
    for n in [*range(1, 1200), 1536, 2304, 3000, 3072, 4095, 4096, 5120, 8960, 10208, 12288, 2**20 + 3]:
        h, n_pad = plan_tiles(n, max_tile)
        assert h in ALLOWED_TILES and 8 <= h <= max_tile and n_pad % h == 0 and n_pad % 8 == 0
        assert 0 <= n_pad - n <= _slack(n), (n, max_tile, h, n_pad)
        assert plan_tiles(n, h) == (h, n_pad)  # the stored tile is enough to re-plan
        if h < max_tile:  # the largest tile within the bound
            assert -(-n // (2 * h)) * 2 * h - n > _slack(n)
        if n >= 800:
            assert (n_pad - n) / n <= 0.01


@pytest.mark.parametrize("n,expect", [(777, (16, 784)), (1000, (8, 1000)), (333, (16, 336)), (4095, (256, 4096)),
                                      (3000, (64, 3008)), (37, (8, 40)), (4096, (256, 4096))])
def test_plan_examples(n, expect):
    assert plan_tiles(n, 256) == expect


def _legacy_encode(w, cfg, key, monkeypatch):
    monkeypatch.setattr(codec_core, "plan_tiles", legacy_plan_tiles)
    q = encode(w, cfg, key=key)
    monkeypatch.undo()
    return q


@pytest.mark.parametrize("shape", [(6, 777), (5, 1000), (3, 37)])
def test_blobs_of_the_legacy_plan_still_decode(monkeypatch, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = _legacy_encode(w, CodecConfig(bps=4.0), "legacy", monkeypatch)
        new = encode(w, CodecConfig(bps=4.0), key="legacy")
    assert (old.tile, old.n_pad) == legacy_plan_tiles(shape[1], 256) != (new.tile, new.n_pad)
    back = EncodedTensor.from_bytes(old.to_bytes())
    assert back.tile == old.tile and torch.equal(decode(back), decode(old))
    assert new.n_pad < old.n_pad


def test_a_tile_no_plan_chooses_is_rejected():
    q = encode(torch.randn(4, 1000), CodecConfig(bps=4.0))
    blob = bytearray(q.to_bytes())
    blob[9] = 11  # log2(tile) = 11: no plan pads 1000 columns to 2048
    import zlib
    blob[-4:] = zlib.crc32(bytes(blob[:-4])).to_bytes(4, "little")
    with pytest.raises(HQFormatError, match="tile 2048"):
        EncodedTensor.from_bytes(bytes(blob))


def test_hqlinear_meta_of_either_plan_validates(monkeypatch):
    lin = torch.nn.Linear(777, 8)
    m = HQLinear.from_linear(lin, CodecConfig(bps=4.0), key="x")
    assert (m.tile, m.n_pad) == (16, 784)
    meta = dict(m.hq_meta)
    validate_meta(meta)
    validate_meta({**meta, "tile": 256, "n_pad": 1024, "streams": [{**meta["streams"][0], "n": 8 * 1024}]})
    with pytest.raises(HQFormatError, match="inconsistent"):
        validate_meta({**meta, "tile": 16, "n_pad": 800})


def _snr(w, q):
    return _snr_of(w, decode(q))


def _snr_of(w, w_hat):
    r = w_hat.double()
    return 10 * math.log10(float(w.double().square().sum() / (r - w.double()).square().sum()))


#: E8 on 4096² iid N(0,1) at 3 / 4 / 5 total bps (`hq-diffusion bench rd`-style encode, seed 0; BENCHMARKS.md
#: section 14), the reference the odd width is held to; `test_odd_width_snr_against_4096_live` re-measures them.
SNR_4096 = {3.0: 16.41, 4.0: 22.59, 5.0: 28.64}


@pytest.mark.parametrize("bps", [3.0, 4.0, 5.0])
def test_odd_width_snr_close_to_4096(bps):
    """1000×777: the plan would pad to 784 (0.9%, ≈ 0.25 dB at 5 bps); split into 776 columns and a transposed
    tail of one column (codec/split.py) it is within 0.3 dB at every rate (BENCHMARKS.md §25)."""
    w = torch.randn(1000, 777, generator=torch.Generator().manual_seed(0))
    main, tail = encode_split(w, CodecConfig(bps=bps))
    assert tail is not None and split_bits(main, tail) <= bps * w.numel()
    assert _snr_of(w, decode_split(main, tail)) >= SNR_4096[bps] - 0.3


def test_odd_width_beats_the_legacy_plan(monkeypatch):
    w = torch.randn(1000, 777, generator=torch.Generator().manual_seed(0))
    old = _legacy_encode(w, CodecConfig(bps=4.0), 0, monkeypatch)
    new = encode(w, CodecConfig(bps=4.0))
    assert _snr(w, new) > _snr(w, old) + 4.0  # 1024 → 784 coded columns


@pytest.mark.slow
def test_odd_width_snr_against_4096_live():
    g = torch.Generator().manual_seed(0)
    big, odd = torch.randn(4096, 4096, generator=g), torch.randn(1000, 777, generator=g)
    for bps in (3.0, 4.0, 5.0):
        cfg = CodecConfig(bps=bps)
        s_big, s_odd = _snr(big, encode(big, cfg)), _snr_of(odd, decode_split(*encode_split(odd, cfg)))
        assert abs(s_big - SNR_4096[bps]) < 0.05
        assert s_odd >= s_big - 0.3


# ---- kernels and HQLinear on odd widths (Triton side) ----------------------------------------------------


def test_odd_width_kernels_in_interpreter():
    """Without a GPU: the ``triton_side`` tests of this file in a child pytest with ``TRITON_INTERPRET=1``."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or dispatch.interpreter_usable():
        pytest.skip("the kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "triton_odd", __file__]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, r.stdout[-3000:]


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("n", ODD_WIDTHS)
def test_triton_odd_rht_kernels(triton_side, n):
    from hq_diffusion import kernels
    from hq_diffusion.codec import ops_ref

    tile, n_pad = plan_tiles(n, 256)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16).to(DEV)
    xp = torch.nn.functional.pad(x, (0, n_pad - n))
    y, ref = kernels.rht(xp, 5, "odd", tile), ops_ref.rht_ref(xp.float(), 5, "odd", tile)
    assert ((y.float() - ref).abs() <= 1e-2 * ref.abs() + 1e-6 * ref.abs().max()).all()
    xq, xs = kernels.rht_quant_int8(x, 5, "odd", tile, n_pad)
    rq, rs = ops_ref.rht_quant_int8_ref(x, 5, "odd", tile, n_pad)
    torch.testing.assert_close(xs, rs, rtol=1e-5, atol=0)
    assert (xq.int() - rq.int()).abs().max() <= 1 and (xq != rq).float().mean() < 0.01


@pytest.mark.parametrize("n,lattice,mma,storage,tokens", [
    (777, "e8", "int8", "rice", 3), (1000, "d4", "int8", "rice", 20), (333, "a2", "bf16", "rice", 2),
    (4095, "e8", "bf16", "int8", 2), (777, "z", "int8", "int8", 2)])
def test_triton_odd_hqlinear_paths(triton_side, n, lattice, mma, storage, tokens):
    """Every mma path (int8 fused ≤ 16 tokens, int8 unfused, bf16; Rice or stored codes) on odd widths:
    the Triton side against the torch references on the same module."""
    lin = torch.nn.Linear(n, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, n, generator=torch.Generator().manual_seed(n)))
    m = HQLinear.from_linear(lin, CodecConfig(bps=4.0, lattice=lattice, block=64), key=f"odd.{n}", mma=mma,
                             storage=storage).to(DEV)
    assert (m.tile, m.n_pad) == plan_tiles(n, 256)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEV)
    y, ref = m.forward_kernel(x), m.forward_native(x)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * float(ref.float().abs().max()))
