"""Tests for hq_diffusion.eval.metrics (pure array inputs, CPU only, no network)."""

import json
import math
import os
import socket

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from hq_diffusion.eval import metrics as M


def _frames(f=3, h=24, w=20, seed=0, lo=0, hi=256):
    return np.random.default_rng(seed).integers(lo, hi, (f, h, w, 3), dtype=np.uint8)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection attempt fails the test."""
    def boom(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", boom)
    monkeypatch.setattr(socket, "create_connection", boom)
    import torch.hub
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", boom)
    monkeypatch.setattr(torch.hub, "download_url_to_file", boom)


# --------------------------------------------------------------------------- PSNR
def test_psnr_known_noise_is_analytic():
    ref = _frames(f=4, lo=20, hi=236)
    rng = np.random.default_rng(1)
    test = ref.copy()
    sigmas = [1, 3, 7, 0]
    for k, s in enumerate(sigmas):  # +-s noise: every squared error is exactly s**2
        signs = rng.choice([-1, 1], size=ref.shape[1:])
        test[k] = (ref[k].astype(int) + s * signs).astype(np.uint8)
    got = M.psnr_per_frame(ref, test)
    assert got.dtype == np.float64 and got.shape == (4,)
    for k, s in enumerate(sigmas):
        if s == 0:
            assert got[k] == math.inf
        else:
            assert got[k] == pytest.approx(10 * math.log10(255.0 ** 2 / s ** 2), abs=1e-12)


def test_psnr_single_channel_lsb_flip():
    ref = _frames(f=2)
    test = ref.copy()
    test[..., 0] ^= 1  # error 1 in one of 3 channels -> MSE 1/3
    np.testing.assert_allclose(M.psnr_per_frame(ref, test), 10 * np.log10(255 ** 2 * 3), rtol=0, atol=1e-12)


def test_identical_frames_psnr_inf_ssim_one():
    a = _frames()
    assert np.all(np.isposinf(M.psnr_per_frame(a, a)))
    np.testing.assert_allclose(M.ssim_per_frame(a, a), 1.0, rtol=0, atol=1e-12)
    assert np.all(np.isposinf(M.flicker_psnr(a, a)))


# --------------------------------------------------------------------------- SSIM
def test_ssim_matches_skimage():
    ref = _frames(f=3, h=40, w=36, seed=2)
    test = np.clip(ref.astype(int) + np.random.default_rng(3).integers(-20, 21, ref.shape), 0, 255).astype(np.uint8)
    got = M.ssim_per_frame(ref, test)
    want = [structural_similarity(ref[i], test[i], channel_axis=-1, data_range=255) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got.shape == (3,) and got.dtype == np.float64


@pytest.mark.parametrize("h,w,win", [(5, 5, 5), (4, 6, 3), (6, 9, 5), (3, 30, 3), (7, 7, 7)])
def test_ssim_small_frames_use_largest_odd_window(h, w, win):
    assert M.ssim_win_size(h, w) == win
    ref = _frames(f=2, h=h, w=w, seed=4)
    test = _frames(f=2, h=h, w=w, seed=5)
    want = [structural_similarity(ref[i], test[i], channel_axis=-1, data_range=255, win_size=win)
            for i in range(2)]
    np.testing.assert_allclose(M.ssim_per_frame(ref, test), want, rtol=0, atol=1e-12)


def test_ssim_too_small_raises():
    a = _frames(f=1, h=2, w=8)
    with pytest.raises(ValueError, match="too small"):
        M.ssim_per_frame(a, a)


# --------------------------------------------------------------------------- flicker
def test_flicker_constant_sequences_and_offset():
    ref = np.repeat(_frames(f=1, lo=30, hi=200), 5, axis=0)  # constant in time
    test = ref + np.uint8(10)  # differs from ref, but equally static
    assert np.all(np.isposinf(M.flicker_psnr(ref, test)))
    assert np.all(np.isfinite(M.psnr_per_frame(ref, test)))


def test_flicker_alternating_is_analytic():
    ref = np.repeat(_frames(f=1, lo=30, hi=200), 6, axis=0)
    d = 5
    test = ref.astype(int)
    test[1::2] += d  # frames alternate: diff(test) = +-d, diff(ref) = 0 -> MSE d**2
    got = M.flicker_psnr(ref, test.astype(np.uint8))
    assert got.shape == (5,)
    np.testing.assert_allclose(got, 10 * math.log10(510.0 ** 2 / d ** 2), rtol=0, atol=1e-12)


def test_flicker_single_frame_is_empty():
    a = _frames(f=1)
    out = M.flicker_psnr(a, a)
    assert out.shape == (0,) and out.dtype == np.float64


# --------------------------------------------------------------------------- audio
def test_audio_snr_known_noise_and_trim():
    a, b = 0.5, 0.005
    ref = np.full(1000, a)
    noise = b * np.where(np.arange(1200) % 2 == 0, 1.0, -1.0)
    test = np.concatenate([ref, np.zeros(200)]) + noise  # longer: trimmed to 1000
    assert M.audio_snr_db(ref, test) == pytest.approx(20 * math.log10(a / b), abs=1e-9)
    # (C, T)
    ref2 = np.stack([ref, -ref])
    test2 = np.stack([ref + noise[:1000], -ref - noise[:1000]])
    assert M.audio_snr_db(ref2, test2) == pytest.approx(40.0, abs=1e-9)
    assert M.audio_snr_db(ref, ref.copy()) == math.inf
    assert M.audio_snr_db(np.zeros(10), np.ones(10)) == -math.inf


def test_audio_snr_bad_inputs():
    with pytest.raises(ValueError, match="channel"):
        M.audio_snr_db(np.zeros((2, 10)), np.zeros((1, 10)))
    with pytest.raises(ValueError, match="shape"):
        M.audio_snr_db(np.zeros((1, 2, 10)), np.zeros((1, 2, 10)))
    with pytest.raises(ValueError, match="NaN"):
        M.audio_snr_db(np.array([1.0, np.nan]), np.zeros(2))


# --------------------------------------------------------------------------- summarize
def test_summarize_handles_inf_and_is_json_safe():
    s = M.summarize(np.array([30.0, 40.0, np.inf, 50.0]))
    assert s["mean"] == 40.0 and s["median"] == 40.0 and s["min"] == 30.0 and s["max"] == 50.0
    assert s["count"] == 4 and s["n_finite"] == 3 and s["n_inf"] == 1
    json.dumps(s, allow_nan=False)
    allinf = M.summarize([math.inf, math.inf])
    assert allinf["mean"] is None and allinf["n_inf"] == 2
    json.dumps(allinf, allow_nan=False)
    # JSON spellings and None accepted
    s2 = M.summarize(["inf", 1.0, None, "-inf", 3.0])
    assert s2["mean"] == 2.0 and s2["n_inf"] == 1 and s2["n_neg_inf"] == 1 and s2["n_nan"] == 1
    assert M.summarize([])["mean"] is None


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("fn", [M.psnr_per_frame, M.ssim_per_frame, M.flicker_psnr])
def test_bad_inputs_raise_helpful_valueerror(fn):
    a = _frames(f=2, h=8, w=8)
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 8, 8, 3\).*\(2, 8, 9, 3\)"):
        fn(a, _frames(f=2, h=8, w=9))
    with pytest.raises(ValueError, match="uint8.*float32"):
        fn(a, a.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\).*img\[None\]"):
        fn(a[0], a[0])
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        fn(np.zeros((2, 8, 8, 4), np.uint8), np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="numpy"):
        fn(a.tolist(), a)


# --------------------------------------------------------------------------- LPIPS
def test_lpips_backbone_file_names_match_torchvision():
    from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

    for net, w in (("alex", AlexNet_Weights), ("vgg", VGG16_Weights), ("squeeze", SqueezeNet1_1_Weights)):
        assert M.LPIPS_BACKBONE_FILES[net] == os.path.basename(w.IMAGENET1K_V1.url)


def test_lpips_unavailable_without_cache_and_no_network(tmp_path, monkeypatch, no_network):
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    lp = M.LPIPSMetric()
    assert lp.available is False
    expected = os.path.join(str(tmp_path), "checkpoints", "alexnet-owt-7be5be79.pth")
    assert expected in lp.reason and "alexnet" in lp.reason and "--lpips-weights" in lp.reason
    a = _frames(f=1, h=32, w=32)
    with pytest.raises(RuntimeError, match="unavailable"):
        lp(a, a)
    missing = M.LPIPSMetric(weights_path=tmp_path / "nope.pth")
    assert not missing.available and "does not exist" in missing.reason
    with pytest.raises(ValueError, match="net"):
        M.LPIPSMetric(net="resnet")


def test_lpips_plumbing_weights_path_not_quality_numbers(tmp_path, no_network):
    """PLUMBING test: random-backbone weights exercise the code path; values are NOT LPIPS."""
    w = M.make_plumbing_weights(tmp_path / "plumbing.pth", net="alex", seed=0)
    lp = M.LPIPSMetric(weights_path=w, batch_size=3)
    assert lp.available and lp.reason is None and lp.plumbing
    ref = _frames(f=5, h=32, w=40, seed=7)
    test = _frames(f=5, h=32, w=40, seed=8)
    d = lp(ref, test)
    assert d.shape == (5,) and d.dtype == np.float64 and np.all(np.isfinite(d)) and np.all(d > 0)
    np.testing.assert_array_equal(lp(ref, ref), np.zeros(5))
    one_by_one = np.concatenate([lp(ref[i:i + 1], test[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(d, one_by_one, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="too small"):
        lp(ref[:, :16, :16], test[:, :16, :16])
    with pytest.raises(ValueError, match="shape mismatch"):
        lp(ref, test[:4])
    # same seed -> same weights -> same numbers
    w2 = M.make_plumbing_weights(tmp_path / "plumbing2.pth", seed=0)
    np.testing.assert_allclose(M.LPIPSMetric(weights_path=w2)(ref, test), d, rtol=1e-6)


def test_lpips_backbone_from_hub_cache_plumbing(tmp_path, monkeypatch, no_network):
    """PLUMBING test of the hub-cache path: a random torchvision AlexNet saved under the
    torchvision file name must be found and mapped onto the lpips backbone."""
    import torch
    import torch.hub
    import torchvision

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tv_state = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(tv_state, ck / "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    lp = M.LPIPSMetric(net="alex")
    assert lp.available, lp.reason
    assert lp.source == str(ck / "alexnet-owt-7be5be79.pth") and not lp.plumbing
    a, b = _frames(f=2, h=32, w=32, seed=1), _frames(f=2, h=32, w=32, seed=2)
    assert np.all(np.isfinite(lp(a, b))) and np.all(lp(a, a) == 0)
    # corrupt cache file -> unavailable with reason, no exception
    (ck / "alexnet-owt-7be5be79.pth").write_bytes(b"garbage")
    bad = M.LPIPSMetric(net="alex")
    assert not bad.available and "could not load" in bad.reason
