"""The HTML report of an ``hq-diffusion eval`` LTX-2 bps sweep renders in headless Chromium: every plot
image is decoded with a nonzero natural size, and the screenshot is not blank.  What a newcomer reads is
there as rendered: the model banner (random weights), the explanations, one prompt id per prompt at every
rate, the stills whose error third is not near-black; the scheme-sweep page renders its figure.

Needs Debian ``chromium`` (and ``chromium-driver`` + selenium for the DOM check); skipped with a reason
otherwise.  The project's set-up installs them (``make browser``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from hq_diffusion.eval import cli

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PLOTS = ["plot-rate-quality", "plot-per-frame-3", "plot-per-frame-4", "plot-per-frame-5", "plot-per-prompt"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> str:
    """Same run as test_eval_runner's ``sweep`` fixture (same arguments, same directory): the runner resumes,
    so whichever module runs second only re-merges."""
    out = tmp_path_factory.getbasetemp() / "ltx2-sweep"
    rc = cli.main(["--model", "tiny-ltx2", "--num-prompts", "2", "--bps", "3,4,5", "--out", str(out),
                      "--no-progress"])
    assert rc == 0
    return str(out / "report.html")


def test_screenshot_is_not_blank(report_html, tmp_path):
    chromium = _chromium()
    png = tmp_path / "report.png"
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           f"--screenshot={png}", "--window-size=1280,2000", "file://" + report_html]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists() and png.stat().st_size > 0, proc.stderr[-2000:]
    import imageio.v2 as iio

    img = np.asarray(iio.imread(png))[..., :3]
    assert img.shape[:2] == (2000, 1280)
    assert img.std() > 10  # not a uniform page
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 256  # plots bring many colours; text alone does not
    # the first plot (rate-quality, above the fold) is drawn: find a long dark axis line
    dark_rows = ((img < 60).all(axis=-1).sum(axis=1) > 200).sum()
    assert dark_rows >= 1


def test_plots_in_rendered_dom(report_html, tmp_path):
    chromium = _chromium()
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if webdriver is None or driver_path is None:
        # Fallback: the DOM Chromium rendered (no natural sizes without a script, but the elements and data).
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=5000", "--dump-dom", "file://" + report_html]
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
        for pid in PLOTS:
            assert f'id="{pid}"' in dom and 'src="data:image/png;base64,' in dom
        pytest.skip("selenium / chromedriver not installed: checked the dumped DOM only")

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag.replace("--headless", "--headless=new"))
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    opts.add_argument("--window-size=1280,2000")
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(60)
        driver.get("file://" + report_html)
        info = driver.execute_script(
            "return Array.from(document.querySelectorAll('img.plot')).map("
            "i => [i.id, i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]);")
        rows = driver.execute_script("return document.querySelectorAll('#prompt-table tr').length;")
        ids = driver.execute_script("return Array.from(document.querySelectorAll('#prompt-table tr td:first-child'))"
                                    ".map(td => td.textContent);")
        banner = driver.execute_script("return document.getElementById('model-info').innerText;")
        explain = driver.execute_script("return document.getElementById('how-to-read').innerText;")
        # mean brightness of each still's error third, read back from the decoded image
        stills = driver.execute_script(
            "return Array.from(document.querySelectorAll('img.still')).map(i => {"
            " const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight;"
            " const g = c.getContext('2d'); g.drawImage(i, 0, 0);"
            " const w = Math.floor(i.naturalWidth / 3);"
            " const d = g.getImageData(2 * w, 0, w, i.naturalHeight).data; let s = 0;"
            " for (let k = 0; k < d.length; k += 4) s += (d[k] + d[k + 1] + d[k + 2]) / 3;"
            " return [i.id, i.naturalWidth, s / (d.length / 4)]; });")
        videos = driver.execute_script("return Array.from(document.querySelectorAll('video')).map(v => v.src);")
    finally:
        driver.quit()
    by_id = {i[0]: i[1:] for i in info}
    assert sorted(by_id) == sorted(PLOTS), info
    for pid, (complete, w, h, shown) in by_id.items():
        assert complete and w > 100 and h > 100 and shown > 100, (pid, complete, w, h, shown)
    assert rows == 1 + 6
    assert ids == ["P0", "P1"] * 3  # the same ids at 3, 4 and 5 bps
    assert "tiny-ltx2" in banner and "random weights (not trained)" in banner
    assert "flicker PSNR" in explain and "gain" in explain and "do not start at 0" in explain
    assert [x[0] for x in stills] == ["still-3", "still-4", "still-5"], stills
    for sid, width, mean in stills:
        assert width > 100 and mean > 40, (sid, width, mean)  # the error panel is visible, not near-black
    assert len(videos) == 6 and all(v.startswith("file://") and v.endswith("video.mp4") for v in videos)
    rep = json.load(open(os.path.join(os.path.dirname(report_html), "report.json")))
    assert len(rep["prompts"]) == 6


def test_sweep_page_screenshot(report_html, tmp_path):
    """The scheme-sweep page (built from this run's report as two schemes) renders its rate-quality figure."""
    from hq_diffusion.eval import sweep as S

    chromium = _chromium()
    rep = json.load(open(os.path.join(os.path.dirname(report_html), "report.json")))
    other = json.loads(json.dumps(rep))
    for e in other["prompts"]:
        e["means"]["psnr"] = e["means"]["psnr"] - 3
    other["suite"] = None
    from hq_diffusion.eval import report as R

    other["suite"] = R.suite_aggregates(other["prompts"])
    S.write_sweep(str(tmp_path / "sw"), {"e8": rep, "z": other})
    png = tmp_path / "sweep.png"
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           f"--screenshot={png}", "--window-size=1280,1000", "file://" + str(tmp_path / "sw" / "report.html")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists() and png.stat().st_size > 0, proc.stderr[-2000:]
    import imageio.v2 as iio

    img = np.asarray(iio.imread(png))[..., :3]
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3), axis=0)) > 256
    # the two scheme lines are drawn in matplotlib's first two colours (C0 blue, C1 orange)
    for rgb in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(img.astype(int) - rgb).sum(axis=-1) < 30).sum() > 50, rgb
