"""Tests for hq_diffusion.eval.report: npz / mp4 / json / csv / html artifacts (CPU only)."""

import base64
import csv
import json
import math
import os
import re

import imageio.v2 as iio
import numpy as np
import pytest

from hq_diffusion.eval import metrics as M
from hq_diffusion.eval import report as R


def _smooth_video(f=5, h=32, w=32, seed=0):
    """Smooth moving gradients (codec-friendly), uint8 (F, H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((f, h, w, 3), np.uint8)
    ph = rng.uniform(0, 6, 3)
    for t in range(f):
        for c in range(3):
            out[t, ..., c] = (127 + 100 * np.sin(x / w * 3 + y / h * 2 + ph[c] + 0.3 * t)).astype(np.uint8)
    return out


def _quantize(v, step, seed=1):
    noise = np.random.default_rng(seed).integers(-step, step + 1, v.shape)
    return np.clip(v.astype(int) + noise, 0, 255).astype(np.uint8)


def _no_temp_files(d):
    return [n for n in os.listdir(d) if n.startswith(".") or ".tmp" in n]


# --------------------------------------------------------------------------- npz / json / csv
def test_frames_npz_roundtrip_atomic(tmp_path):
    ref, q = _smooth_video(), _quantize(_smooth_video(), 3)
    p = R.write_frames_npz(tmp_path / "frames.npz", ref, q)
    with np.load(p) as z:
        assert set(z.files) == {"ref", "quant"}
        assert z["ref"].dtype == np.uint8 and z["ref"].shape == (5, 32, 32, 3)
        np.testing.assert_array_equal(z["ref"], ref)
        np.testing.assert_array_equal(z["quant"], q)
    assert _no_temp_files(tmp_path) == []
    with pytest.raises(ValueError, match="shape mismatch"):
        R.write_frames_npz(tmp_path / "bad.npz", ref, q[:3])
    assert not (tmp_path / "bad.npz").exists() and _no_temp_files(tmp_path) == []


def test_json_is_strict_and_keeps_inf_as_string(tmp_path):
    obj = {"a": np.float32(1.5), "b": np.array([1.0, np.inf, -np.inf, np.nan]), 2.5: (1, 2),
           "n": np.int64(3), "flag": np.bool_(True)}
    p = R.write_json_atomic(tmp_path / "x.json", obj)
    text = open(p).read()
    assert "Infinity" not in text and "NaN" not in text
    back = json.loads(text)
    assert back == {"a": 1.5, "b": [1.0, "inf", "-inf", None], "2.5": [1, 2], "n": 3, "flag": True}
    assert _no_temp_files(tmp_path) == []


def test_csv_union_columns(tmp_path):
    rows = [{"prompt": "a, \"quoted\"", "psnr": 31.123456789012345},
            {"prompt": "b", "ssim": 0.9, "psnr": math.inf, "extra": [1, 2]}]
    p = R.write_csv_atomic(tmp_path / "x.csv", rows)
    with open(p, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0].keys()) == ["prompt", "psnr", "ssim", "extra"]
    assert got[0]["prompt"] == 'a, "quoted"' and float(got[0]["psnr"]) == 31.123456789012345
    assert got[0]["ssim"] == "" and got[1]["psnr"] == "inf" and json.loads(got[1]["extra"]) == [1, 2]


# --------------------------------------------------------------------------- video
def test_error_maps():
    ref = _smooth_video(f=2, h=8, w=8)
    q = ref.copy()
    q[..., 1] = np.clip(q[..., 1].astype(int) + 10, 0, 255)
    raw = R.error_maps(ref, q, gain=4.0, colormap=None)
    want = np.clip(np.abs(ref.astype(int) - q.astype(int)) * 4, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(raw, want)
    heat = R.error_maps(ref, ref, gain=4.0)
    assert heat.dtype == np.uint8 and heat.shape == ref.shape
    assert np.all(heat == heat[0, 0, 0])  # zero error -> one colour (colormap minimum)
    with pytest.raises(ValueError, match="gain"):
        R.error_maps(ref, q, gain=0)


@pytest.mark.parametrize("h,w", [(32, 32), (45, 33)])
def test_side_by_side_mp4_readback(tmp_path, h, w):
    ref = _smooth_video(f=5, h=h, w=w)
    q = _quantize(ref, 4)
    p = R.write_side_by_side_mp4(tmp_path / "sbs.mp4", ref, q, fps=8)
    assert _no_temp_files(tmp_path) == []
    rd = iio.get_reader(p)
    try:
        meta = rd.get_meta_data()
        assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
        frames = [fr for fr in rd]
    finally:
        rd.close()
    assert len(frames) == 5
    H, W3 = frames[0].shape[:2]
    panel = R.side_by_side_frames(ref, q)[0]
    assert (H, W3) == panel.shape[:2]
    assert H >= 128 and H % 2 == 0 and W3 % 2 == 0 and W3 % 3 == 0
    pw = W3 // 3
    s = math.ceil(128 / h)
    assert pw in (w * s, w * s + 1)
    # left panel is the (upscaled) reference, middle the quantized frames (lossy codec)
    left = frames[2][: h * s : s, : w * s : s].astype(int)
    mid = frames[2][: h * s : s, pw: pw + w * s: s].astype(int)
    assert np.abs(left - ref[2]).mean() < 6
    assert np.abs(mid - q[2]).mean() < 8


def test_side_by_side_mp4_with_audio(tmp_path):
    ref = _smooth_video(f=8)
    q = _quantize(ref, 2)
    sr = 16000
    audio = 0.3 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)
    p = R.write_side_by_side_mp4(tmp_path / "a.mp4", ref, q, fps=8, audio=np.stack([audio, audio]),
                                 audio_sample_rate=sr)
    rd = iio.get_reader(p)
    try:
        assert rd.get_meta_data().get("audio_codec") == "aac"
        assert rd.count_frames() == 8
    finally:
        rd.close()
    assert _no_temp_files(tmp_path) == []
    with pytest.raises(ValueError, match="audio_sample_rate"):
        R.write_side_by_side_mp4(tmp_path / "b.mp4", ref, q, audio=audio)
    with pytest.raises(ValueError, match=r"\(C, T\)"):
        R.write_side_by_side_mp4(tmp_path / "b.mp4", ref, q, audio=np.stack([audio, audio]).T,
                                 audio_sample_rate=sr)
    with pytest.raises(ValueError, match="uint8"):
        R.write_side_by_side_mp4(tmp_path / "b.mp4", ref.astype(float), q)
    assert not (tmp_path / "b.mp4").exists()


# --------------------------------------------------------------------------- report
def _build_run(tmp_path, bps_list=(2.0, 3.0), lpips=None):
    prompts = ["a red fox", "waves <at> night & 'stars'"]
    entries = []
    for bps in bps_list:
        for i, prompt in enumerate(prompts):
            ref = _smooth_video(f=4, seed=i)
            q = _quantize(ref, int(8 / bps), seed=int(10 * bps) + i)
            if i == 1 and bps == bps_list[-1]:
                q[0] = ref[0]  # one identical frame -> PSNR inf
            sub = f"p{i}_b{R.bps_key(bps)}"
            (tmp_path / sub).mkdir()
            R.write_frames_npz(tmp_path / sub / "frames.npz", ref, q)
            R.write_side_by_side_mp4(tmp_path / sub / "sbs.mp4", ref, q)
            pf = {"psnr": M.psnr_per_frame(ref, q), "ssim": M.ssim_per_frame(ref, q),
                  "lpips": lpips(ref, q) if lpips else None, "flicker_psnr": M.flicker_psnr(ref, q)}
            entries.append({"prompt": prompt, "seed": 100 + i, "bps": bps, "per_frame": pf,
                            "means": R.prompt_means(pf), "audio_snr_db": None,
                            "video": f"{sub}/sbs.mp4", "frames": f"{sub}/frames.npz"})
    return {"model": "tiny-dit", "config": {"steps": 2, "resolution": [32, 32]},
            "compression": {"bits per weight": 2.13, "ratio": 7.5},
            "bps_list": list(bps_list), "prompts": entries, "suite": R.suite_aggregates(entries),
            "lpips": {"available": lpips is not None, "reason": None if lpips else "no weights",
                      "plumbing": lpips is not None}}


def test_report_numbers_recomputable_from_npz(tmp_path):
    rep = _build_run(tmp_path)
    R.write_json_atomic(tmp_path / "report.json", rep)
    back = json.load(open(tmp_path / "report.json"))
    n_inf = 0
    for e in back["prompts"]:
        with np.load(tmp_path / e["frames"]) as z:
            ref, q = z["ref"], z["quant"]
        for name, fn in (("psnr", M.psnr_per_frame), ("ssim", M.ssim_per_frame),
                         ("flicker_psnr", M.flicker_psnr)):
            stored = np.array([float(v) for v in e["per_frame"][name]])
            want = fn(ref, q)
            assert np.array_equal(np.isinf(stored), np.isinf(want))
            fin = np.isfinite(want)
            np.testing.assert_allclose(stored[fin], want[fin], rtol=0, atol=1e-6)
            n_inf += int(np.sum(~fin))
            assert e["means"][name] == pytest.approx(float(np.mean(want[fin])), abs=1e-6)
    assert n_inf >= 1  # the identical frame went through JSON as "inf"
    # suite numbers recompute from the per-prompt means in the JSON
    for key, s in back["suite"].items():
        ents = [e for e in back["prompts"] if R.bps_key(e["bps"]) == key]
        psnr_means = [e["means"]["psnr"] for e in ents]
        assert s["psnr"]["mean"] == pytest.approx(np.mean(psnr_means), abs=1e-9)
        assert s["psnr"]["median"] == pytest.approx(np.median(psnr_means), abs=1e-9)
        worst = min(ents, key=lambda e: e["means"]["psnr"])
        assert s["worst_prompt"]["prompt"] == worst["prompt"]
        assert s["worst_prompt"]["psnr"] == pytest.approx(worst["means"]["psnr"])
    assert R.suite_aggregates(back["prompts"]) == back["suite"]


def test_suite_aggregates_worst_and_inf():
    entries = [
        {"prompt": "perfect", "seed": 0, "bps": 2, "per_frame": {"psnr": ["inf", "inf"], "ssim": [1, 1]}},
        {"prompt": "bad", "seed": 1, "bps": 2, "per_frame": {"psnr": [20.0, 22.0], "ssim": [0.5, 0.7]}},
        {"prompt": "ok", "seed": 2, "bps": 2, "per_frame": {"psnr": [30.0, 34.0], "ssim": [0.9, 0.9]}},
        {"prompt": "ok", "seed": 2, "bps": 4.5, "per_frame": {"psnr": [40.0], "ssim": [0.99]}},
    ]
    suite = R.suite_aggregates(entries)
    assert list(suite) == ["2", "4.5"]
    s = suite["2"]
    assert s["n_prompts"] == 3 and s["worst_prompt"]["prompt"] == "bad" and s["worst_prompt"]["index"] == 1
    assert s["psnr"]["mean"] == pytest.approx(26.5) and s["psnr"]["n_nan"] == 1  # all-inf prompt has no finite mean
    assert s["lpips"] is None and s["audio_snr_db"] is None
    assert suite["4.5"]["worst_prompt"]["psnr"] == 40.0
    json.dumps(suite, allow_nan=False)


def _imgs(text):
    return re.findall(r'<img class="plot" id="([^"]+)" alt="([^"]+)" src="([^"]+)"', text)


def test_html_report_plots_and_links(tmp_path):
    rep = _build_run(tmp_path)
    p = R.write_html_report(tmp_path / "report.html", rep)
    text = open(p, encoding="utf-8").read()
    imgs = _imgs(text)
    ids = {i for i, _, _ in imgs}
    assert {"plot-rate-quality", "plot-per-frame-2", "plot-per-frame-3", "plot-per-prompt"} <= ids
    for _, alt, src in imgs:
        assert alt and src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for e in rep["prompts"]:
        assert f"<video controls preload='metadata' src='{e['video']}'>" in text
        assert f"href='{e['frames']}'" in text
        assert (tmp_path / e["video"]).exists()
    assert "waves &lt;at&gt; night &amp; &#x27;stars&#x27;" in text and "<at>" not in text
    assert "tiny-dit" in text and "bits per weight" in text and "7.5" in text
    assert "LPIPS not computed: no weights" in text
    assert "id='suite-table'" in text and "id='prompt-table'" in text
    assert _no_temp_files(tmp_path) == []


def test_html_report_single_bps_lpips_and_plots_dir(tmp_path):
    """LPIPS here comes from PLUMBING weights (random backbone): checks the plumbing only."""
    lp = M.LPIPSMetric(weights_path=M.make_plumbing_weights(tmp_path / "w.pth"))
    rep = _build_run(tmp_path, bps_list=(2.5,), lpips=lp)
    rep.pop("suite")  # computed by the writer when absent
    (tmp_path / "html").mkdir()
    p = R.write_html_report(tmp_path / "html" / "report.html", rep, plots_dir_or_inline=tmp_path / "html" / "plots")
    text = open(p, encoding="utf-8").read()
    imgs = _imgs(text)
    ids = {i for i, _, _ in imgs}
    assert "plot-rate-quality" not in ids and {"plot-per-frame-2.5", "plot-per-prompt"} <= ids
    for pid, _, src in imgs:
        assert src == f"plots/{pid}.png" and (tmp_path / "html" / src).exists()
    assert "LPIPS" in dict((i, a) for i, a, _ in imgs)["plot-per-prompt"]
    assert "PLUMBING" in text
    with pytest.raises(ValueError, match="prompts"):
        R.write_html_report(tmp_path / "bad.html", {"model": "x"})


# --------------------------------------------------------------------------- the page, read as a newcomer would
def _figures(monkeypatch, rep, tmp_path):
    """Write the page for ``rep`` and return every matplotlib figure it drew, drawn, by first axes title."""
    from hq_diffusion.eval import plots as P

    figs = []
    real = P.png_bytes
    monkeypatch.setattr(P, "png_bytes", lambda fig: (figs.append(fig), real(fig))[1])
    text = open(R.write_html_report(tmp_path / "report.html", rep), encoding="utf-8").read()
    return {f.axes[0].get_title(): f for f in figs}, text


def _with_index(rep):
    for e in rep["prompts"]:
        e["index"] = 1 if e["prompt"] == "a red fox" else 0  # suite order differs from entry order
    return rep


def test_bar_charts_zoom_to_data_and_legend_covers_nothing(tmp_path, monkeypatch):
    rep = _with_index(_build_run(tmp_path))
    figs, _ = _figures(monkeypatch, rep, tmp_path)
    fig = figs["mean PSNR (dB, higher = better)"]
    by_title = {ax.get_title(): ax for ax in fig.axes}
    ssim_ax = by_title["mean SSIM (higher = better)"]
    ssim = [float(e["means"]["ssim"]) for e in rep["prompts"]]
    lo, hi = ssim_ax.get_ylim()
    assert 0.5 < lo < min(ssim) and max(ssim) <= hi <= 1.0  # not from 0: SSIM bars of 0.97 vs 0.99 differ visibly
    psnr_ax = by_title["mean PSNR (dB, higher = better)"]
    psnr = [float(e["means"]["psnr"]) for e in rep["prompts"]]
    lo, hi = psnr_ax.get_ylim()
    assert 0 < lo < min(psnr) and max(psnr) < hi
    # no legend inside an axes; the figure legend overlaps no axes (hence no bar)
    renderer = fig.canvas.get_renderer()
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert len(fig.legends) == 1
    leg = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not leg.overlaps(ax.get_window_extent(renderer)), ax.get_title()
        for bar in ax.patches:
            assert not leg.overlaps(bar.get_window_extent(renderer))
    assert [t.get_text() for t in psnr_ax.get_xticklabels()] == ["P0/s101", "P1/s100"]


def test_legend_bbox_check_catches_a_legend_inside_the_axes():
    """The overlap check above fails on a legend placed inside an axes (the old layout)."""
    from hq_diffusion.eval import plots as P

    fig = P.per_prompt_bars(["P0", "P1"], [("2 bps", {"psnr": np.array([30.0, 31.0])}),
                                          ("3 bps", {"psnr": np.array([35.0, 36.0])})], ["psnr"])
    fig.legends.clear()
    fig.axes[0].legend(loc="upper left")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    assert fig.axes[0].get_legend().get_window_extent(r).overlaps(fig.axes[0].get_window_extent(r))


def test_value_range():
    from hq_diffusion.eval.plots import value_range

    assert value_range([0.991, 0.995], "ssim") == pytest.approx((0.9904, 0.9956))
    assert value_range([1.0, 1.0], "ssim") == pytest.approx((0.995, 1.0))
    assert value_range([0.9, 1.0], "agreement") == pytest.approx((0.885, 1.0))
    assert value_range([40.0, 45.0, float("inf"), None], "psnr") == pytest.approx((39.25, 45.75))
    assert value_range([], "psnr") == (0.0, 1.0)
    assert value_range([0.01, 0.02], "lpips")[0] >= 0.0


def test_prompt_ids_are_the_same_at_every_bps(tmp_path, monkeypatch):
    rep = _with_index(_build_run(tmp_path, bps_list=(2.0, 3.0)))
    for e in rep["prompts"]:
        e["seed"] = 0
    figs, text = _figures(monkeypatch, rep, tmp_path)
    rows = re.findall(r"<tr id='prompt-(\d+)'><td>([^<]+)</td><td>([^<]+)</td>", text)
    ids = {(html_id, prompt.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&#x27;", "'"))
           for _, html_id, prompt in rows}
    assert ids == {("P1", "a red fox"), ("P0", "waves <at> night & 'stars'")}  # one id per prompt at 2 and 3 bps
    bars = figs["mean PSNR (dB, higher = better)"].axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["P0", "P1"]
    assert "<td>P1</td><td>a red fox</td>" in text  # the id table under the bars
    visible = re.sub(r'src="data:[^"]*"', "", text)
    assert not re.search(r">S\d|>P[2-9]", visible)  # no bar-only ids, no per-bps renumbering
    curves = figs["2 bps  (identical frames, PSNR = \u221e, are not drawn)"]
    assert [h.get_text().split(":")[0] for h in curves.legends[0].get_texts()] == ["P0", "P1"]
    suite_rows = re.findall(r"<td rowspan='\d+'>(P\d): ", text)
    assert suite_rows and set(suite_rows) <= {"P0", "P1"}


def test_page_explains_metrics_gain_and_names_the_model(tmp_path, monkeypatch):
    from hq_diffusion.integrations import families

    rep = _with_index(_build_run(tmp_path))
    rep["model"] = "tiny-ltx"
    rep["config"]["model_seed"] = 3
    text = open(R.write_html_report(tmp_path / "a.html", rep), encoding="utf-8").read()
    assert "id='how-to-read'" in text
    explain = text[text.index("id='how-to-read'"):]
    explain = explain[: explain.index("</dl>")]
    assert "flicker PSNR" in explain and "frame-to-frame" in explain
    assert "gain" in explain and "64/32/16/8/4" in explain
    assert "do not start at 0" in explain
    banner = re.search(r"<p class='model' id='model-info'>(.*?)</p>", text).group(1)
    assert "tiny-ltx" in banner and "random weights (not trained)" in banner and "seed 3" in banner
    # the real trained embedded model (not a mock of the registry) is called trained, with its own label
    rep["model"] = "tiny-ltx-trained"
    text = open(R.write_html_report(tmp_path / "b.html", rep), encoding="utf-8").read()
    banner = re.search(r"<p class='model' id='model-info'>(.*?)</p>", text).group(1)
    assert "trained weights" in banner and "random" not in banner and "noise" not in banner
    assert families.trained("tiny-ltx-trained").label in banner
    rep["model"] = str(tmp_path)  # a diffusers directory
    text = open(R.write_html_report(tmp_path / "c.html", rep), encoding="utf-8").read()
    assert "weights from the directory" in text
    # every row states its video's error-map gain, and the gain matches the frames
    gains = re.findall(r"<td class='num'>\u00d7(\d+)</td>", text)
    assert len(gains) == len(rep["prompts"])
    for g, e in zip(gains, rep["prompts"]):
        with np.load(tmp_path / e["frames"]) as z:
            assert int(g) == R.auto_error_gain(z["ref"], z["quant"])


def test_error_panel_is_not_near_black():
    """A near-lossless rate (mean error ~1 level, like a 42 dB tiny model) still gives a visible error panel."""
    ref = _smooth_video(f=3, h=16, w=16)
    q = _quantize(ref, 2, seed=5)
    sbs = R.side_by_side_frames(ref, q)
    err_panel = sbs[:, :, 2 * sbs.shape[2] // 3:]
    assert err_panel.mean() > 40, err_panel.mean()
    assert R.auto_error_gain(ref, q) == 64
    assert R.auto_error_gain(ref, ref) == 64
    big = _quantize(ref, 60, seed=6)
    assert R.auto_error_gain(ref, big) == 4
    mid = np.clip(ref.astype(int) + 20, 0, 255).astype(np.uint8)  # error 20 -> 8 * 20 = 160 <= 192 < 16 * 20
    assert R.auto_error_gain(ref, mid) == 8
    # the mp4 uses one gain for the whole video: its error panel is the same as composing all frames at once
    np.testing.assert_array_equal(R.side_by_side_frames(ref[1:2], q[1:2], R.auto_error_gain(ref, q)), sbs[1:2])


def test_page_shows_a_still_with_its_error_map(tmp_path):
    rep = _with_index(_build_run(tmp_path))
    text = open(R.write_html_report(tmp_path / "report.html", rep), encoding="utf-8").read()
    stills = re.findall(r'<img class="still" id="(still-[^"]+)" alt="([^"]+)" src="data:image/png;base64,([^"]+)"',
                        text)
    assert [s[0] for s in stills] == ["still-2", "still-3"]
    for _, alt, data in stills:
        img = iio.imread(base64.b64decode(data))
        h, w3 = img.shape[:2]
        assert w3 == 3 * (w3 // 3) and h >= 32
        assert img[:, 2 * w3 // 3:].mean() > 40  # the error third is visible
        assert re.search(r"error \u00d7\d+", alt)
    rep["prompts"][1]["frames"] = "gone/frames.npz"  # worst prompt of 2 bps: its frames file is missing
    text = open(R.write_html_report(tmp_path / "r2.html", rep), encoding="utf-8").read()
    assert "still not shown" in text and "gone/frames.npz" in text
