"""``hq-diffusion app --model QUANTIZED_DIR [--reference KEY|FLOAT_DIR|none]``: a pipeline saved quantized by
hq-diffusion is served as stored (loaded once, never re-quantized; the request's quantization settings are not
used), beside its float reference (``--reference`` or the origin the directory records) or alone (no PSNR/SSIM,
None in the API's metrics); a broken directory is one line at start-up.

All on the trained tiny LTX saved quantized to a tmp dir; 32x32, 9 frames, 2 steps.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import hq_diffusion
from hq_diffusion.app.config import AppSettings, GenerationRequest, QuantSettings

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PROMPT = "a red circle moving right on a blue background"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The trained tiny LTX (float32) quantized at 3 bps on the D4 lattice and saved (it records its origin)."""
    from hq_diffusion.models import tiny_pipeline

    root = tmp_path_factory.mktemp("app-quantized")
    pipe = tiny_pipeline("tiny-ltx-trained", dtype=torch.float32)
    hq_diffusion.quantize(pipe, bps=3.0, lattice="d4", progress=False)
    hq_diffusion.save_quantized(pipe, root / "q")
    return str(root / "q")


def _req(model, **over):
    kw = dict(model=model, prompt=PROMPT, seed=1, frames=9, height=32, width=32, steps=2,
              # not what the directory holds: must be ignored
              quant=QuantSettings(bps=6.0, lattice="e8", kv_enabled=True, kv_bps=5.0))
    kw.update(over)
    return GenerationRequest(**kw)


def _engine(tmp_path, models, reference=None, **kw):
    from hq_diffusion.app.engine import Engine

    def no_quantize(pipe, **kwargs):
        raise AssertionError("a directory saved quantized must not be quantized again")

    return Engine(AppSettings(models=tuple(models), reference=reference), quantize_fn=no_quantize,
                  workdir=str(tmp_path / "work"), **kw)


def test_recorded_reference_side_by_side(saved, tmp_path):
    e = _engine(tmp_path, [saved])
    try:
        sv = e.saved(saved)
        assert sv.reference == "tiny-ltx-trained" and "recorded" in sv.note
        assert e.kind(saved) == "ltx"
        res = e.run(_req(saved))
        m = res.metrics()
        # the directory's settings, not the request's
        assert m["request"]["quant"]["bps"] == 3.0 and m["request"]["quant"]["lattice"] == "d4"
        assert m["request"]["quant"]["kv_enabled"] is False
        assert m["no_reference"] is False and m["reference"]["model"] == "tiny-ltx-trained"
        assert m["reference"]["quantized_dir"] == os.path.abspath(saved)
        assert m["output"] == {"frames": 9, "height": 32, "width": 32}
        assert len(m["per_frame"]["psnr"]) == 9 and all(math.isfinite(p) for p in m["per_frame"]["psnr"])
        assert m["means"]["psnr"] > 15 and 0 < m["means"]["ssim"] <= 1
        for v in (res.bf16_video, res.quant_video, res.error_video):
            assert v.endswith(".mp4") and os.path.getsize(v) > 0
        w = m["compression"]["weights"]
        assert 2.0 < w["bits_per_weight"] < 4.5 and w["ratio"] > 3  # measured on what the directory stores
        assert m["compression"]["saved"]["requested_bps"] == 3.0 and m["compression"]["saved"]["dtype"] == "float32"
        assert m["timings"]["quantized_pipeline_cached"] is True and e.stats["quantizations"] == 0
        # the reference is built in the saved dtype (float32), as the eval does
        assert e._loaded[saved].pipe.transformer.dtype == torch.float32
        # the same request again: identical frames; the reference comes from the cache
        again = e.run(_req(saved)).metrics()
        assert again["digests"] == m["digests"] and again["timings"]["bf16_cached"] is True
        from hq_diffusion.app.ui import compression_card, metrics_markdown, psnr_frame

        assert "Mean PSNR" in metrics_markdown(m) and "Saved directory" in compression_card(m)
        assert len(psnr_frame(m)) == 9
    finally:
        e.close()


def test_reference_none_gives_the_quantized_column_alone(saved, tmp_path):
    e = _engine(tmp_path, [saved], reference="none")
    try:
        res = e.run(_req(saved))
        m = res.metrics()
        assert res.bf16_video is None and res.error_video is None and os.path.getsize(res.quant_video) > 0
        assert m["no_reference"] is True and m["reference"]["model"] is None
        assert m["reference"]["note"] == "no float reference: --reference none"
        assert m["per_frame"] == {"psnr": None, "ssim": None, "lpips": None}
        assert m["means"] == {"psnr": None, "ssim": None, "lpips": None}
        assert m["error_map_gain"] is None and m["timings"]["bf16_seconds"] is None
        assert m["digests"]["bf16_sha256"] is None and m["compression"]["weights"]["bits_per_weight"] > 2
        assert e.stats["bf16_generations"] == 0
        json.dumps(m)  # JSON-safe
        from hq_diffusion.app.ui import compression_card, metrics_markdown, psnr_frame, quant_note

        text = metrics_markdown(m)
        assert "No float reference: PSNR/SSIM not computed** (--reference none)" in text
        assert "no float reference" in compression_card(m) and len(psnr_frame(m)) == 0
        assert "fixes bps and lattice" in quant_note(e.saved(saved))
    finally:
        e.close()


def test_given_reference_and_unfit_ones(saved, tmp_path):
    from hq_diffusion.app.engine import resolve_saved

    assert resolve_saved(saved, "tiny-ltx-trained").note == "given by --reference"
    with pytest.raises(ValueError, match="--reference tiny-flux is a flux model"):
        resolve_saved(saved, "tiny-flux")
    with pytest.raises(ValueError, match="itself saved quantized"):
        resolve_saved(saved, saved)
    assert resolve_saved("tiny-ltx") is None
    with pytest.raises(ValueError, match="--reference applies to a --model saved quantized"):
        AppSettings(models=("tiny-ltx",), reference="none")


def test_bad_directory_is_one_line_at_startup(saved, tmp_path, capsys, monkeypatch):
    from hq_diffusion.app import server
    from hq_diffusion.app.server import main

    def must_not_serve(*a, **k):
        raise AssertionError("a bad --model directory must stop the app before it serves")

    monkeypatch.setattr(server, "start", must_not_serve)

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    cfg = broken / "transformer" / "config.json"
    data = json.loads(cfg.read_text())
    data["quantization_config"]["config"]["_data"].pop("bps")
    cfg.write_text(json.dumps(data))
    assert main(["--model", str(broken), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "carries no HQConfig bps" in err and "Traceback" not in err

    tampered = tmp_path / "tampered"
    shutil.copytree(saved, tampered)
    with open(tampered / "scheduler" / "scheduler_config.json", "a") as fh:
        fh.write(" ")
    assert main(["--model", str(tampered), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hq-diffusion app: error: --model" in err and "scheduler" in err

    assert main(["--model", saved, "--reference", "tiny-pixart", "--port", "0"]) == 2
    assert "tiny-pixart is a pixart model" in capsys.readouterr().err


def test_served_api_with_and_without_reference(saved):
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    from hq_diffusion.app.server import start

    args = dict(model=saved, prompt=PROMPT, negative_prompt="", seed=1, frames=9, height=32, width=32, steps=2,
                bps=4.0, lattice="e8", mma="auto", kv_enabled=False, kv_bps=4.0, kv_correction="haar+dither")
    for reference in (None, "none"):
        with start(AppSettings(port=0, models=(saved, "tiny-ltx"), reference=reference), preload=False) as app:
            bf16, quant, err, plot, text, card, m = Client(app.url, verbose=False).predict(**args,
                                                                                           api_name="/generate")
            lim = Client(app.url, verbose=False).predict(api_name="/limits")
            assert lim["saved_quantized"][saved]["lattice"] == "d4" and "tiny-ltx" not in lim["saved_quantized"]
            assert lim["saved_quantized"][saved]["reference"] == (None if reference else "tiny-ltx-trained")
            path = quant["video"] if isinstance(quant, dict) else quant
            assert path.endswith(".mp4") and os.path.getsize(path) > 0
            assert m["request"]["quant"]["lattice"] == "d4" and "bits/weight" in card
            if reference is None:
                assert bf16 is not None and err is not None and m["means"]["psnr"] > 15
                assert [row[0] for row in plot["data"]] == list(range(9))
            else:
                assert bf16 is None and err is None and m["means"]["psnr"] is None
                assert m["per_frame"]["ssim"] is None and "PSNR/SSIM not computed" in text
                assert not plot or not plot.get("data")
            assert np.isfinite(m["compression"]["weights"]["bits_per_weight"])
