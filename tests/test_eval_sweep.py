"""``hq-diffusion eval --schemes``: the rate-quality sweep over lattices and the RTN int4 g128 peer, its files,
its figure (one line per scheme, agreement when recorded) and the table ``eval`` prints.

The fast tests use TEST DOUBLES: ``_noise_quantize`` (test_eval_runner's ``_mechanics_quantize``) perturbs the
transformer's linear weights for the lattice schemes (the real ``hq_diffusion.quantize`` runs in the slow test), and ``_weights_generate`` makes frames from
the transformer's weights without running the pipeline.  The RTN peer always runs for real (it is cheap).
No quality number is taken from a double.
"""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
import torch

from hq_diffusion.eval import cli, peers
from hq_diffusion.eval import sweep as S
from hq_diffusion.eval.files import EvalInputError
from test_eval_runner import _mechanics_quantize

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


_noise_quantize = _mechanics_quantize  # same TEST DOUBLE as the runner's tests (lattice is ignored)


def _noise_summary(pipe):
    rec = getattr(pipe.transformer, peers.RTN_RECORD, None)
    if rec is not None:  # the RTN peer's own summary
        return peers.rtn_summary(pipe)
    return {"summary": {"ratio": 16.0 / pipe._mechanics_bps, "weighted_bps": pipe._mechanics_bps}, "text": "double"}


class _WeightsGenerate:
    """TEST DOUBLE generate_fn: 3 frames of 16x16 whose pixels are a fixed projection of the transformer's
    linear weights (so quantizing changes them a little), and a log of (quantized?, prompt) calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, pipe, cfg, prompt, seed):
        w = torch.cat([m.weight.detach().float().flatten()[:256] for m in pipe.transformer.modules()
                       if isinstance(m, torch.nn.Linear)])
        rng = np.random.default_rng(abs(hash((prompt, seed))) % 2**32)
        proj = rng.standard_normal((3 * 16 * 16 * 3, w.numel())).astype(np.float32) / np.sqrt(w.numel())
        x = proj @ w.numpy()
        frames = np.clip(128 + 600 * x, 0, 255).astype(np.uint8).reshape(3, 16, 16, 3)
        self.calls.append((hasattr(pipe, "_mechanics_bps") or hasattr(pipe.transformer, peers.RTN_RECORD), prompt))
        return {"frames": frames, "audio": None, "audio_sample_rate": None}


def _argv(out, *extra):
    return ["--model", "tiny-ltx", "--num-prompts", "2", "--bps", "3,4", "--out", str(out), "--no-progress",
            *extra]


@pytest.fixture(scope="module")
def fast_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    gen = _WeightsGenerate()
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(_argv(out, "--schemes", "e8,z,rtn4"), quantize_fn=_noise_quantize,
                      summary_fn=_noise_summary, generate_fn=gen)
    return out, rc, buf.getvalue(), gen


def test_sweep_runs_every_scheme_and_shares_references(fast_sweep):
    out, rc, _, gen = fast_sweep
    assert rc == 0
    refs = [c for c in gen.calls if not c[0]]
    assert len(refs) == 2  # the two references are generated once, for all three schemes
    assert len(gen.calls) == 2 + 2 * 2 * 2 + 2  # + e8 and z at 3 and 4 bps + rtn4 at its own rate
    for s in ("e8", "z", "rtn4"):
        assert os.path.isfile(out / s / "report.html") and len(os.listdir(out / s / "ref")) == 2
    rtn = json.load(open(out / "rtn4" / "report.json"))
    assert rtn["bps_list"] == [4.25] and rtn["config"]["bits"] == 4 and rtn["config"]["group"] == 128
    z = json.load(open(out / "z" / "report.json"))
    assert z["config"]["lattice"] == "z" and z["bps_list"] == [3.0, 4.0]


def test_sweep_files_and_points(fast_sweep):
    out, *_ = fast_sweep
    sw = json.load(open(out / "sweep.json"))
    assert sw["schemes"] == ["e8", "z", "rtn4"] and sw["missing"] == 0
    pts = [(p["scheme"], p["bps"]) for p in sw["points"]]
    assert pts == [("e8", 3.0), ("e8", 4.0), ("z", 3.0), ("z", 4.0), ("rtn4", 4.25)]
    rtn = sw["points"][-1]
    assert rtn["bits_per_weight"] >= 4.25 and rtn["ratio"] == pytest.approx(16 / rtn["bits_per_weight"])
    assert all(p["psnr"] is not None and p["agreement"] is None for p in sw["points"])
    with open(out / "sweep.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 5
    assert open(out / "rate_quality.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(out / "report.html", encoding="utf-8").read()
    assert "src='rate_quality.png'" in page and "id='sweep-table'" in page and "id='model-info'" in page
    for s in ("e8", "z", "rtn4"):
        assert f"href='{s}/report.html'" in page


def test_eval_prints_a_table(fast_sweep, tmp_path, capsys):
    _, _, text, _ = fast_sweep
    lines = text.splitlines()
    assert lines[0].startswith("hq-diffusion eval: tiny-ltx (random weights), 2 prompt(s) x 1 seed(s)")
    assert re.match(r"\s+scheme\s+bps\s+bits/weight\s+ratio\s+PSNR dB", lines[1])
    rows = [ln.split() for ln in lines[2:7]]
    assert [(r[0], r[1]) for r in rows] == [("e8", "3"), ("e8", "4"), ("z", "3"), ("z", "4"), ("rtn4", "4.25")]
    assert any(ln.strip().startswith("report") for ln in lines)
    # a single run prints a table too: a row per bps with the worst prompt's id
    rc = cli.main(_argv(tmp_path / "one"), quantize_fn=_noise_quantize, summary_fn=_noise_summary,
                  generate_fn=_WeightsGenerate())
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert re.match(r"\s+bps\s+bits/weight\s+ratio\s+PSNR dB\s+min PSNR\s+SSIM", lines[1])
    assert [ln.split()[0] for ln in lines[2:4]] == ["3", "4"] and all(" P" in ln for ln in lines[2:4])


def test_sweep_figure_has_a_line_per_scheme_and_agreement():
    rows = [{"scheme": s, "label": S.SCHEMES[s][0], "bps": b, "bits_per_weight": b + 0.01, "psnr": 30 + b + i,
             "agreement": 0.5 + 0.1 * b} for i, s in enumerate(("e8", "d4")) for b in (2.0, 3.0)]
    rows.append({"scheme": "rtn4", "label": S.SCHEMES["rtn4"][0], "bps": 4.25, "bits_per_weight": 4.4,
                 "psnr": 36.0, "agreement": 0.8})
    fig = S.rate_quality_figure(rows, "tiny-ltx")
    fig.canvas.draw()
    psnr_ax, agree_ax = fig.axes
    assert len(psnr_ax.lines) == 3 and len(agree_ax.lines) == 3
    assert list(psnr_ax.lines[2].get_xdata()) == [4.4]  # the peer at its own measured rate
    assert "agreement" in agree_ax.get_title() and 0 <= agree_ax.get_ylim()[0] and agree_ax.get_ylim()[1] <= 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [S.SCHEMES[s][0] for s in ("e8", "d4", "rtn4")]
    r = fig.canvas.get_renderer()
    assert not any(fig.legends[0].get_window_extent(r).overlaps(ax.get_window_extent(r)) for ax in fig.axes)
    no_agree = S.rate_quality_figure([{**x, "agreement": None} for x in rows])
    assert len(no_agree.axes) == 1
    # five schemes on the one-panel figure: the legend wraps inside the figure, covering no axes
    five = [{**x, "scheme": s, "label": S.SCHEMES[s][0]} for s in S.SCHEMES for x in rows[:2]]
    fig = S.rate_quality_figure([{**x, "agreement": None} for x in five])
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    leg, box = fig.legends[0].get_window_extent(r), fig.bbox
    assert len(fig.legends[0].get_texts()) == 5
    assert box.x0 <= leg.x0 and leg.x1 <= box.x1 and box.y0 <= leg.y0 and leg.y1 <= box.y1, (leg, box)
    assert not leg.overlaps(fig.axes[0].get_window_extent(r))


def test_sweep_page_shows_agreement_when_recorded(fast_sweep, tmp_path):
    out, *_ = fast_sweep
    reports = {s: json.load(open(out / s / "report.json")) for s in ("e8", "rtn4")}
    for rep in reports.values():
        for n, e in enumerate(rep["prompts"]):
            e["agreement"] = [1.0, 0.5][n % 2]
    sw = S.write_sweep(str(tmp_path), reports)
    assert [p["agreement"] for p in sw["points"]] == [0.75, 0.75, 0.75]
    page = open(tmp_path / "report.html", encoding="utf-8").read()
    assert "<th>agreement</th>" in page and "content agreement" in page


def test_every_scheme_runs_its_share_when_this_process_does_not_merge(tmp_path):
    """With --no-barrier (or on a rank > 0) a run returns None: the sweep still runs every scheme, then stops
    without writing the sweep files."""
    from hq_diffusion.eval import config as eval_config

    cfg = eval_config.build_config(cli.build_parser().parse_args(_argv(tmp_path)))
    seen = []
    assert S.run_sweep(cfg, ("e8", "d4", "rtn4"), run=lambda sub, **kw: seen.append(
        (os.path.basename(sub.out), sub.bps_list, kw.get("quantize_fn"))), progress=False) is None
    assert seen == [("e8", (3.0, 4.0), None), ("d4", (3.0, 4.0), None), ("rtn4", (4.25,), peers.rtn_quantize)]
    assert not os.path.exists(tmp_path / "sweep.json")


def test_bad_schemes_are_refused(tmp_path, capsys):
    for argv, msg in ((["--schemes", "e8,q9"], "unknown scheme 'q9'"), (["--schemes", "e8,e8"], "duplicates"),
                      (["--schemes", "e8", "--lattice", "d4"], "exclude each other"),
                      (["--schemes", "rtn4", "--kv-bps", "4"], "weights only")):
        assert cli.main(_argv(tmp_path / "bad", *argv)) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(EvalInputError, match="empty"):
        S.parse_schemes(" , ")


def test_rtn_peer_rate_and_layers():
    from hq_diffusion.models import tiny_pipeline

    pipe = tiny_pipeline("ltx", seed=0, dtype=torch.float32)
    before = {n: m.weight.detach().clone() for n, m in pipe.transformer.named_modules()
              if isinstance(m, torch.nn.Linear)}
    peers.rtn_quantize(pipe, bps=4.25)
    s = peers.rtn_summary(pipe)["summary"]
    rec = getattr(pipe.transformer, peers.RTN_RECORD)
    assert s["layers"] and s["skipped"] and not set(s["layers"]) & set(s["skipped"])
    mods = dict(pipe.transformer.named_modules())
    want_bits = 0
    for n in s["layers"]:
        k = before[n].shape[1]
        g = 128 if k % 128 == 0 else k
        want_bits += before[n].numel() * 4 + before[n].numel() // g * 32
        assert len(torch.unique(mods[n].weight[0, :g])) <= 16  # int4: at most 16 levels per group
    for n in s["skipped"]:
        assert torch.equal(mods[n].weight, before[n])
    assert rec["total_bits"] == want_bits and s["weighted_bps"] == pytest.approx(want_bits / rec["weights"])
    with pytest.raises(ValueError, match="4.25"):
        peers.rtn_quantize(tiny_pipeline("ltx", seed=0), bps=4.0)
    with pytest.raises(ValueError, match="not quantized"):
        peers.rtn_summary(tiny_pipeline("ltx", seed=0))


@pytest.mark.slow
def test_real_sweep_on_tiny_ltx(tmp_path):
    """The real quantizer and pipeline: E8 and Z at 3 and 4 bps, and the RTN peer."""
    rc = cli.main(_argv(tmp_path, "--schemes", "e8,z,rtn4"))
    assert rc == 0
    sw = json.load(open(tmp_path / "sweep.json"))
    for p in sw["points"]:
        assert p["bits_per_weight"] <= p["bps"] + 0.01 or p["scheme"] == "rtn4"
        assert 15 < p["psnr"] < 80
