"""``hq-diffusion inspect``: statistics against analytic values, inputs, and the table/HTML outputs."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from hq_diffusion.bench import inspect as hq_inspect


def _t(nu: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    return z / (torch.randn(nu, n, generator=g, dtype=torch.float64).square().sum(0) / nu).sqrt()


def test_moments_gaussian_and_student_t():
    # sizes keep the estimators' standard errors (Gaussian: sqrt(24/n) = 0.01 for kurtosis) well inside the bounds
    k, s = hq_inspect.moments(torch.randn(1 << 18, generator=torch.Generator().manual_seed(0)))
    assert abs(k) < 0.05 and abs(s) < 0.02
    k, s = hq_inspect.moments(_t(10, 1 << 19))  # excess kurtosis of t_nu: 6 / (nu - 4) = 1
    assert abs(k - 1.0) < 0.15 and abs(s) < 0.05
    u = torch.rand(1 << 18, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k, s = hq_inspect.moments(-torch.log1p(-u))  # Exponential(1): skewness 2, excess kurtosis 6
    assert abs(s - 2) < 0.05 and abs(k - 6) < 0.5
    with pytest.raises(ValueError, match="constant"):
        hq_inspect.moments(torch.ones(10))


def test_ks_against_analytic_values():
    n = 1 << 16
    d = hq_inspect.ks_normal(torch.randn(n, generator=torch.Generator().manual_seed(1)))
    assert d < 1.63 / math.sqrt(n)  # 99% Kolmogorov quantile
    # uniform standardized: sup |F_U - Phi| over x, computed on a fine grid
    x = torch.linspace(-3, 3, 600001, dtype=torch.float64)
    fu = ((x + math.sqrt(3)) / (2 * math.sqrt(3))).clamp(0, 1)
    want = float((fu - 0.5 * (1 + torch.erf(x / math.sqrt(2)))).abs().max())
    got = hq_inspect.ks_normal(torch.rand(1 << 20, generator=torch.Generator().manual_seed(2)))
    assert abs(got - want) < 3e-3, (got, want)


def test_layer_stats_rht_gaussianizes_heavy_tails():
    g = torch.Generator().manual_seed(0)
    w = _t(5, 256 * 512).float().reshape(256, 512)
    w[:, :5] *= 10
    s = hq_inspect.layer_stats("blocks.0.ff", w, 4.0)
    assert s["kurt_before"] > 5 and abs(s["kurt_after"]) < 0.5 and s["ks_after"] < s["ks_before"]
    assert s["bps"] <= 4.0 and s["bits"] == math.ceil(s["bits"]) and s["snr"] > 15
    assert 0 <= s["tile_spread"] < 0.5


def test_inspect_file_and_html(tmp_path, capsys):
    f = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.randn(32, 256), "bias": torch.randn(32)}, str(f))
    html = tmp_path / "r.html"
    assert hq_inspect.main([str(f), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "a.weight" in out and "bias" not in out
    page = html.read_text()
    assert "data:image/png;base64," in page and "a.weight" in page


def test_inspect_bad_inputs_name_the_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        hq_inspect.load_weights("no-such-model")
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="x.bin"):
        hq_inspect.load_weights(str(tmp_path / "x.bin"))


@pytest.mark.slow
def test_inspect_registry_model(capsys):
    # builds the tiny LTX transformer: minutes on a loaded 2-core CPU
    assert hq_inspect.main(["tiny-ltx", "--max-layers", "2"]) == 0
    assert "SNR dB" in capsys.readouterr().out
