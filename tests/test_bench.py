"""The benchmark commands run end to end on small sizes and their comparisons hold."""
import pytest

from hq_diffusion.bench import baselines, e2e, rd, speed, tails
from hq_diffusion.cli import main as cli


def test_rd_small(capsys, tmp_path):
    out = tmp_path / "rd.md"
    assert rd.main(["--rows", "64", "--cols", "1024", "--rates", "3,4", "--no-baselines", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| E8 | 4 |" in text and "Shannon" in text


def test_baselines_rates_and_quality():
    import torch

    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    w_hat, bits = baselines.rtn_groupwise(w, 4)
    assert bits / w.numel() == 4.25 and 19 < baselines.snr_db(w, w_hat) < 21
    w_hat, bits = baselines.normal_float(w, 4)
    assert bits / w.numel() == 4.25 and 19 < baselines.snr_db(w, w_hat) < 21
    lv = baselines.nf_levels(4)
    assert lv.numel() == 16 and (lv == 0).any() and lv.max() == 1 and lv.min() == -1


def test_speed_and_tails_small(capsys):
    assert speed.main(["--rows", "64", "--cols", "512", "--repeat", "1"]) == 0
    assert tails.main(["--rows", "64", "--cols", "512"]) == 0
    out = capsys.readouterr().out
    assert "encode MB/s" in out and "Excess kurtosis" in out


def test_e2e_hq_beats_rtn_at_equal_rate_on_trained_like_weights():
    r = e2e.run(num_prompts=1, progress=False, init="trained-like")
    assert r["hq"]["bps"] <= 4.0 < r["rtn"]["bps"]
    assert r["hq_eq"]["bps"] <= r["rtn"]["bps"]
    assert r["hq_eq"]["psnr"] > r["rtn"]["psnr"]


def test_cli_bench_usage(capsys):
    assert cli(["bench"]) == 2
    assert "rd" in capsys.readouterr().err
    assert cli([]) == 0
    with pytest.raises(SystemExit):
        cli(["nonsense"])
