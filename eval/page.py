"""Building blocks of the evaluation pages (``report.html`` of a run, ``report.html`` of a scheme sweep):
which model made the page and whether its weights are trained, the "how to read this page" text, prompt
ids that stay the same at every bit rate, number formatting, and image embedding.  Plain Python / numpy in,
HTML strings out; nothing here runs a model.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from typing import Any, Callable
from urllib.parse import quote

import numpy as np

from . import metrics as _m

__all__ = ["agreement", "prompt_ids", "id_order", "model_info", "model_banner", "explanations", "fmt", "short",
           "rel_link", "CSS", "Images", "load_pair", "png_rgb"]


def agreement(e: dict) -> float | None:
    """The quantized output's per-prompt content agreement in [0, 1] if the runner recorded one
    (``e["content"]["quant"]["agreement"]``, from :func:`hq_diffusion.eval.content.check_pair`;
    or ``e["agreement"]`` / ``e["means"]["agreement"]``), else None."""
    v = ((e.get("content") or {}).get("quant") or {}).get("agreement")
    if v is None:
        v = e.get("agreement")
    if v is None:
        v = (e.get("means") or {}).get("agreement")
    return None if v is None else float(v)


def prompt_ids(prompt_entries: list[dict]) -> list[str]:
    """One id per entry, the same for the same prompt at every bit rate: ``P<index>`` with ``index`` the
    prompt's index in the suite (``e["index"]``; entries without one are numbered by first appearance of
    their prompt text), plus ``/s<seed>`` when the entries hold several seeds."""
    seen: dict[str, int] = {}
    for e in prompt_entries:
        if e.get("index") is None and e.get("prompt") not in seen:
            seen[e.get("prompt")] = len(seen)
    several_seeds = len({e.get("seed") for e in prompt_entries}) > 1
    out = []
    for e in prompt_entries:
        idx = e.get("index") if e.get("index") is not None else seen[e.get("prompt")]
        out.append(f"P{idx}" + (f"/s{e.get('seed')}" if several_seeds else ""))
    return out


def id_order(pid: str) -> tuple:
    """Sort key of a :func:`prompt_ids` id: ``"P10/s2"`` -> ``(10, 2)`` (P2 before P10)."""
    return tuple(int(t) for t in re.findall(r"\d+", pid))


def model_info(model: Any, config: dict | None = None) -> dict:
    """What made a report: ``{"model", "label", "family", "trained", "weights"}``.

    For an embedded tiny model the family registry (:mod:`hq_diffusion.integrations.families`) gives the
    label and whether its weights are trained (:func:`families.is_trained`: shipped trained weights); a
    diffusers directory's weights are whatever it stores (``trained`` None).  ``config["model_seed"]`` names
    the random initialisation."""
    from hq_diffusion.integrations import families

    model = str(model)
    try:
        fam = families.by_alias(model)
    except families.UnknownFamilyError:
        return {"model": model, "label": "diffusers pipeline directory", "family": None, "trained": None,
                "weights": "loaded from the pipeline directory (as stored there)"}
    trained = families.is_trained(model)
    seed = (config or {}).get("model_seed")
    weights = ("trained (shipped with the package)" if trained else
               "random initialisation" + (f" (seed {seed})" if seed is not None else "")
               + ": its videos look like noise; its numbers show what is measured, not a real model's quality")
    label = families.trained(model).label if trained else fam.label
    return {"model": model, "label": label, "family": fam.key, "trained": trained, "weights": weights}


def short(s: Any, n: int = 40) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "\u2013"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    if math.isnan(f):
        return "\u2013"
    if math.isinf(f):
        return "\u221e" if f > 0 else "\u2212\u221e"
    return f"{f:.{digits}f}"


def rel_link(p: str) -> str:
    return html.escape(quote(str(p).replace(os.sep, "/"), safe="/:#?=&%"), quote=True)


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.2em}
th,td{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img.plot,img.still{max-width:100%;border:1px solid #eee;margin:.4em 0}
img.still{image-rendering:pixelated}
video{max-width:480px}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:.4em .8em}
.model{background:#eef4ff;border:1px solid #9db7e0;padding:.4em .8em}
dl.explain dt{font-weight:600;margin-top:.4em} dl.explain dd{margin-left:1.2em}
.note{color:#555;font-size:13px}
"""


def model_banner(info: dict) -> str:
    """The page's "which model made this" paragraph (``id='model-info'``) from :func:`model_info`."""
    trained = {True: "trained weights", False: "random weights (not trained)", None: "weights from the directory"}
    return (f"<p class='model' id='model-info'>Model: <b id='model'>{html.escape(info['model'])}</b> "
            f"({html.escape(info['label'])}) \u2014 <b id='model-weights'>{trained[info['trained']]}</b>: "
            f"{html.escape(info['weights'])}.</p>")


def explanations(has_agreement: bool = False) -> str:
    """The page's "how to read this page" list (``id='how-to-read'``): every metric, the error-map gain and
    the zoomed bar axes."""
    items = [
        ("PSNR (dB)", "peak signal-to-noise ratio of each quantized frame against the unquantized frame with "
                      "the same prompt and seed, 10\u00b7log10(255\u00b2 / MSE); higher is closer; \u221e = "
                      "identical frame."),
        ("SSIM", "structural similarity of each frame pair (1 = identical)."),
        ("LPIPS", "learned perceptual distance (0 = identical; lower is better), when its weights are present."),
        ("flicker PSNR (dB)", "PSNR between the frame-to-frame changes of the two videos "
                              "(quant[t+1] \u2212 quant[t] against ref[t+1] \u2212 ref[t], peak 510): low when "
                              "the quantized video flickers or moves differently from the reference even if "
                              "each frame looks close; \u221e when the changes agree exactly."),
        ("error map (\u00d7 gain)", "the third panel of each video: |reference \u2212 quantized| averaged over "
                                   "RGB, multiplied by the gain shown next to it, through the inferno colour map "
                                   "(black = no error, yellow = error \u00d7 gain \u2265 255).  The gain is chosen "
                                   "per video, the largest of 64/32/16/8/4 that keeps the 99th-percentile error "
                                   "at or below 192/255, so a small error is still visible; compare gains before "
                                   "comparing two error maps."),
        ("bar and line charts", "value axes are zoomed to the data range (they do not start at 0), so small "
                                "differences show; read the axis labels.  Prompts keep one id (P\u2039index in "
                                "the suite\u203a) at every bit rate."),
    ]
    if has_agreement:
        items.insert(3, ("content agreement", "fraction of the prompt's content checks (object colour, "
                                              "motion direction) that the generated video passes, 0\u20131."))
    body = "".join(f"<dt>{html.escape(a)}</dt><dd>{html.escape(b)}</dd>" for a, b in items)
    return f"<h2>How to read this page</h2><dl class='explain' id='how-to-read'>{body}</dl>"


def load_pair(html_dir: str, rel: str | None) -> tuple[np.ndarray, np.ndarray] | str:
    """(ref, quant) uint8 (F, H, W, 3) from an item's frames.npz, or why they cannot be shown."""
    if not rel:
        return "no frames file recorded"
    fn = os.path.join(html_dir, str(rel))
    try:
        with np.load(fn, allow_pickle=False) as z:
            ref, quant = z["ref"], z["quant"]
        _m._check_frames(ref, quant, fn)
    except (OSError, KeyError, ValueError, EOFError) as e:
        return f"{rel}: {type(e).__name__}: {e}"
    return ref, quant


def png_rgb(frame: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) image."""
    import imageio.v3 as iio3

    return iio3.imwrite("<bytes>", np.ascontiguousarray(frame), extension=".png")


class Images:
    """Embeds PNGs in a page: inline base64 data URIs, or files in a plots directory (written with
    ``write(path, bytes)``, an atomic writer) linked relatively."""

    def __init__(self, html_dir: str, plots_dir_or_inline: str | os.PathLike | None,
                 write: Callable[[str, bytes], Any]):
        self.write = write
        self.html_dir = html_dir
        self.inline = plots_dir_or_inline is None or plots_dir_or_inline == "inline"
        self.dir = None if self.inline else os.fspath(plots_dir_or_inline)
        if self.dir:
            os.makedirs(self.dir, exist_ok=True)

    def tag(self, data: bytes, pid: str, alt: str, cls: str = "plot") -> str:
        if self.inline:
            src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        else:
            fn = os.path.join(self.dir, pid + ".png")
            self.write(fn, data)
            src = rel_link(os.path.relpath(os.path.abspath(fn), self.html_dir))
        return (f'<img class="{cls}" id="{html.escape(pid, quote=True)}" '
                f'alt="{html.escape(alt, quote=True)}" src="{src}">')
