"""Drive the app in headless Chromium (selenium + chromedriver): type a prompt, click Generate, wait until
both videos can play, and save a screenshot.

Used by ``tests/test_app_browser.py`` and to make the README screenshot::

    python -m hq_diffusion.app.screenshot --out assets/app_screenshot.png

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``) and the
``selenium`` package; nothing here reaches the network (the server binds 127.0.0.1, Chromium runs with
background networking, component updates and sync off).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager

__all__ = ["CHROMIUM", "CHROMEDRIVER", "missing_requirements", "chromium", "generate_in_browser", "page_state",
           "click_generate_expect_error", "save_full_page", "main"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--autoplay-policy=no-user-gesture-required")

# JS: state of the page after a generation (videos, metrics, card), read in one round trip.
_PAGE_STATE_JS = """
const v = (id) => { const e = document.querySelector(id + ' video');
    return e ? {ready: e.readyState, error: e.error ? e.error.code : null, width: e.videoWidth,
                duration: e.duration, paused: e.paused, loop: e.loop, src: e.currentSrc} : null; };
const text = (id) => { const e = document.querySelector(id); return e ? e.innerText : ''; };
return {bf16: v('#hq-video-bf16'), quant: v('#hq-video-quant'), error: v('#hq-video-error'),
        metrics: text('#hq-metrics'), card: text('#hq-card'),
        plot: !!document.querySelector('#hq-psnr-plot canvas, #hq-psnr-plot svg'),
        toast: Array.from(document.querySelectorAll('[data-testid="toast-text"]'))
            .map((e) => e.innerText).join('\\n')};
"""


def missing_requirements() -> str | None:
    """Why the browser cannot run here (None when chromium, chromedriver and selenium are all present)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        return ("needs " + ", ".join(missing) + " (apt-get install -y chromium chromium-driver; "
                "pip install selenium)")
    return None


@contextmanager
def chromium(width: int = 1480, height: int = 1120):
    """A headless Chromium WebDriver with a fresh profile directory (removed afterwards)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="hq-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate(driver)
        if last:
            return last
        time.sleep(0.25)
    state = page_state(driver)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; page state: {state}")


def page_state(driver) -> dict:
    return driver.execute_script(_PAGE_STATE_JS)


def _type(box, text: str) -> None:
    """Replace a textarea's text the way a user does (WebElement.clear() bypasses the app's input events)."""
    from selenium.webdriver.common.keys import Keys

    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if text:
        box.send_keys(text)


def click_generate_expect_error(driver, prompt: str, timeout: float = 30.0) -> str:
    """Type ``prompt`` on the open page, click Generate, and return the text of the error message the app
    shows (TimeoutError if none appears)."""
    from selenium.webdriver.common.by import By

    _type(driver.find_element(By.CSS_SELECTOR, "#hq-prompt textarea"), prompt)
    driver.find_element(By.CSS_SELECTOR, "#hq-generate").click()
    return _wait(driver, lambda d: page_state(d)["toast"], timeout, "an error message")


def generate_in_browser(driver, url: str, prompt: str, *, kv: bool = False, timeout: float = 180.0) -> dict:
    """Open ``url``, type ``prompt`` (and tick "Quantize attention K/V" if ``kv``), click Generate and wait
    until the three videos are playable (``readyState >= 2``) and the metrics are shown.

    Returns:
        :func:`page_state` (per video: readyState, error, size, duration...; metrics and card text).
    Raises:
        TimeoutError (with the page state), RuntimeError when the app shows an error message.
    """
    from selenium.webdriver.common.by import By

    driver.set_page_load_timeout(60)
    driver.get(url)
    box = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#hq-prompt textarea"), 60, "the prompt box")[0]
    _type(box, prompt)
    if kv:
        tick = driver.find_element(By.CSS_SELECTOR, "#hq-kv input[type=checkbox]")
        if not tick.is_selected():
            tick.click()
    driver.find_element(By.CSS_SELECTOR, "#hq-generate").click()

    def done(d):
        s = page_state(d)
        if s.get("toast"):
            raise RuntimeError(f"the app showed an error: {s['toast']}")
        ok = all(s[k] and s[k]["ready"] >= 2 and s[k]["error"] is None for k in ("bf16", "quant", "error"))
        return s if ok and "Mean PSNR" in s["metrics"] and "bits/weight" in s["card"] else None

    state = _wait(driver, done, timeout, "both videos to be playable and the metrics")
    time.sleep(1.0)  # let the plot draw and the videos play a few frames
    # The video entries are those of the moment all three were playable: afterwards the sync script may
    # seek a looping video, which briefly drops its readyState to 1 while the frame loads.
    later = page_state(driver)
    return {**later, **{k: state[k] for k in ("bf16", "quant", "error")}}


def save_full_page(driver, path: str) -> str:
    """PNG of the whole page, beyond the window (Chrome DevTools ``Page.captureScreenshot``)."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    from hq_diffusion.eval.report import write_bytes_atomic

    return write_bytes_atomic(path, base64.b64decode(shot["data"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hq_diffusion.app.screenshot", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("assets", "app_screenshot.png"), help="PNG to write")
    p.add_argument("--prompt", default="a large yellow circle moving right on a gray background",
                   help="a held-out caption of the default trained model")
    p.add_argument("--no-kv", action="store_true", help="leave K/V quantization off")
    args = p.parse_args(argv)
    why = missing_requirements()
    if why:
        print(f"screenshot: {why}", file=sys.stderr)
        return 2
    from .config import AppSettings
    from .server import start

    with start(AppSettings(port=0)) as app, chromium() as driver:
        state = generate_in_browser(driver, app.url, args.prompt, kv=not args.no_kv)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        save_full_page(driver, args.out)
    print(f"wrote {args.out}; page: {state['metrics'].splitlines()[0] if state['metrics'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
