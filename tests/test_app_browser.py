"""The app in a real browser: headless Chromium (selenium + chromedriver) opens the served app, types a prompt,
clicks Generate, waits until the bf16, quantized and error-map videos can play (readyState >= 2), checks the
metrics and the compression card, and saves a screenshot. Skipped when chromium, chromedriver or selenium are
missing (Debian: apt-get install -y chromium chromium-driver)."""
import os

import pytest

from hq_diffusion.app.screenshot import missing_requirements

pytestmark = pytest.mark.skipif(missing_requirements() is not None,
                                reason=f"browser test: {missing_requirements()}")


def test_generate_in_headless_chromium(tmp_path):
    from hq_diffusion.app.config import AppSettings
    from hq_diffusion.app.screenshot import chromium, click_generate_expect_error, generate_in_browser, page_state
    from hq_diffusion.app.server import start

    with start(AppSettings(port=0)) as app, chromium() as driver:
        state = generate_in_browser(driver, app.url, "a white horse running on the beach", kv=True, timeout=240)
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))

        for key in ("bf16", "quant", "error"):
            v = state[key]
            assert v["ready"] >= 2 and v["error"] is None, (key, v)
            assert v["width"] >= 256 and v["duration"] > 0 and v["loop"], (key, v)  # upscaled, looping
        assert state["bf16"]["src"] != state["quant"]["src"]
        assert "Mean PSNR" in state["metrics"] and "Mean SSIM" in state["metrics"] and "LPIPS" in state["metrics"]
        assert "bits/weight" in state["card"] and "bits/scalar" in state["card"]  # K/V was ticked
        assert state["plot"], "the per-frame PSNR plot was not drawn"
        assert not state["toast"]

        # the prompt typed in the browser is what was generated
        assert app.engine.stats["quant_generations"] == 1
        (req,) = [k for k in app.engine._bf16]
        assert req[1] == "a white horse running on the beach"

        # autoplay: the videos play (and the sync script keeps them going)
        playing = page_state(driver)
        assert not playing["bf16"]["paused"] and not playing["quant"]["paused"]

        # the videos play in sync (the follower is kept within ~0.1 s of the bf16 video, modulo the loop)
        t = driver.execute_script("return ['#hq-video-bf16 video', '#hq-video-quant video']"
                                  ".map((s) => document.querySelector(s).currentTime)")
        dur = playing["bf16"]["duration"]
        drift = abs(t[0] - t[1]) % dur
        assert min(drift, dur - drift) < 0.35, (t, dur)

        # a request the app refuses gets a plain message, not a traceback
        msg = click_generate_expect_error(driver, "")
        assert "The prompt is empty" in msg and "Traceback" not in msg

        # nothing is fetched from outside the server
        urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        outside = [u for u in urls if not u.startswith(app.url) and not u.startswith(("data:", "blob:"))]
        assert not outside, outside
    assert shot.stat().st_size > 10_000 and os.path.exists(shot)
