"""``hq-diffusion demo`` (``make demo``): the tiny LTX pipeline at 4 bps weights + 4-bit K/V, one prompt."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_demo_one_prompt(tmp_path, capsys):
    from hq_diffusion import demo

    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--num-prompts", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("hq-diffusion demo: tiny-ltx-trained (trained weights)")
    for key in ("compression", "weight bits/weight", "K/V bits/scalar", "mean PSNR", "mean SSIM", "mean LPIPS",
                "worst prompt", "report"):
        assert any(ln.strip().startswith(key) for ln in text.splitlines()), (key, text)
    rep = json.load(open(out / "report.json"))
    q = rep["quantization"]["4"]
    assert rep["config"]["kv_bps"] == 4.0 and q["kv"] is not None
    kv_bits = next(iter(q["kv"].values()))["summary"]["bits_per_scalar"]
    assert 3.5 < kv_bits < 5.0
    assert f"{q['ratio']:.2f}x" in text and f"{q['weighted_bps']:.3f}" in text and f"{kv_bits:.3f}" in text
    mean_psnr = rep["suite"]["4"]["psnr"]["mean"]
    assert f"{mean_psnr:.2f} dB" in text
    if rep["lpips"]["available"]:
        assert f"{rep['suite']['4']['lpips']['mean']:.4f}" in text
    else:
        assert "unavailable: " + rep["lpips"]["reason"] in text
    assert str(out / "report.html") in text or os.path.relpath(out / "report.html") in text
    e = rep["prompts"][0]
    for rel in (e["video"], e["frames"]):
        assert (out / rel).is_file()
    with np.load(out / e["frames"]) as z:
        assert z["ref"].shape == z["quant"].shape == (9, 32, 32, 3)
    # the default model is the trained one, on a held-out caption: the content check applies to both columns
    from hq_diffusion.tiny import data

    assert data.parse_caption(e["prompt"]) in data.heldout_captions()
    assert set(e["content"]) == {"ref", "quant"} and e["content"]["ref"]["expected_colour"]
    c = rep["content"]["4"]
    assert c["n"] == 1 and f"{100 * c['ref']:.0f}% unquantized, {100 * c['quant']:.0f}% quantized" in text
    for name in ("report.json", "report.csv", "report.html", "run.json"):
        assert (out / name).is_file()
