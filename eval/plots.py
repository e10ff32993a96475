"""The figures of the evaluation reports (matplotlib, Agg canvas, no display): per-frame curves, per-prompt bar
charts and rate–quality lines.  Inputs are plain numbers already taken out of the report dict by
:mod:`hq_diffusion.eval.report` / :mod:`hq_diffusion.eval.sweep`; nothing here reads files or runs a model.

Conventions a reader of the page relies on:

- Value axes are *zoomed to the data* (:func:`value_range`), never forced to start at 0: SSIM bars of
  0.990 and 0.995 would otherwise both look like 1.0.  The page says so under each chart.
- Legends sit *outside* the axes (above them), so no legend covers a bar, a point or a line.
- Prompts are named by the ids of :func:`hq_diffusion.eval.report.prompt_ids` (``P<index>``, the prompt's
  index in the suite, the same at every bit rate).
"""

from __future__ import annotations

import io
import math
import textwrap
from typing import Iterable, Sequence

import numpy as np

__all__ = ["new_figure", "png_bytes", "value_range", "per_frame_curves", "per_prompt_bars", "rate_quality",
           "METRIC_TITLES"]

#: axis titles of the metrics the reports plot
METRIC_TITLES = {"psnr": "mean PSNR (dB, higher = better)", "ssim": "mean SSIM (higher = better)",
                 "lpips": "mean LPIPS (lower = better)", "flicker_psnr": "mean flicker PSNR (dB)",
                 "agreement": "content agreement (0\u20131, higher = better)"}
#: hard bounds of each metric's axis (a zoomed range never leaves them)
_BOUNDS = {"ssim": (None, 1.0), "lpips": (0.0, None), "agreement": (0.0, 1.0), "psnr": (0.0, None),
           "flicker_psnr": (0.0, None)}


def new_figure(width: float = 9.0, height: float = 4.2):
    """A matplotlib Figure on an Agg canvas with constrained layout (room for a legend outside the axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _finite(values: Iterable) -> np.ndarray:
    """float64 (N,) with every non-finite entry (inf, NaN, None) as NaN."""
    a = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    a[~np.isfinite(a)] = np.nan
    return a


def value_range(values: Iterable, metric: str | None = None, pad: float = 0.15) -> tuple[float, float]:
    """A y-axis range zoomed to the finite ``values``: ``[min - p, max + p]`` with ``p = pad * (max - min)``
    (equal values: ``p`` = 0.5% of ``|max|``, at least 1e-3, so they still get a visible band), clipped to the
    metric's natural bounds (SSIM <= 1, agreement in [0, 1], dB and LPIPS >= 0).  No finite value: ``(0, 1)``."""
    a = _finite(values)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 0.0, 1.0
    lo, hi = float(a.min()), float(a.max())
    p = pad * (hi - lo) if hi > lo else max(0.005 * max(abs(hi), abs(lo)), 1e-3)
    lo, hi = lo - p, hi + p
    floor, ceil = _BOUNDS.get(metric or "", (None, None))
    if floor is not None:
        lo = max(lo, floor)
    if ceil is not None:
        hi = min(hi, ceil)
        lo = min(lo, ceil - p)  # all values at the ceiling: keep a band below it
    return lo, hi


def _legend_above(fig, axes: Sequence, ncol: int | None = None) -> None:
    """One legend for the figure, above the axes (outside every axes box), in as many columns as fit the
    figure's width (more rows otherwise); nothing when there is nothing to label."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    if labels:
        longest = max(len(t) for t in labels)  # ~0.075 in per character at 8 pt, plus the marker
        fits = max(1, int(fig.get_figwidth() // (0.075 * longest + 0.6)))
        fig.legend(handles, labels, loc="outside upper center", ncols=ncol or min(len(labels), fits), fontsize=8,
                   frameon=False)


def per_frame_curves(curves: Sequence[tuple[str, Sequence | None, Sequence | None]], title: str):
    """PSNR (top) and SSIM (bottom) per frame, one line per ``(label, psnr (F,), ssim (F,))``; non-finite
    values (identical frames, PSNR = inf) are not drawn.  Returns the Figure."""
    fig = new_figure(9, 6)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    all_psnr, all_ssim = [], []
    for label, psnr, ssim in curves:
        if psnr is not None:
            y = _finite(psnr)
            all_psnr += list(y)
            ax1.plot(np.arange(len(y)), y, marker=".", label=label)
        if ssim is not None:
            y = _finite(ssim)
            all_ssim += list(y)
            ax2.plot(np.arange(len(y)), y, marker=".", label=label)
    ax1.set_ylabel("PSNR (dB)")
    ax1.set_ylim(*value_range(all_psnr, "psnr"))
    ax1.set_title(title + "  (identical frames, PSNR = \u221e, are not drawn)", fontsize=9)
    ax2.set_ylabel("SSIM")
    ax2.set_ylim(*value_range(all_ssim, "ssim"))
    ax2.set_xlabel("frame")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    if len(curves) <= 12:
        _legend_above(fig, [ax1])
    return fig


def per_prompt_bars(ids: Sequence[str], groups: Sequence[tuple[str, dict]], metrics: Sequence[str]):
    """Grouped bars: one panel per metric, one group of bars per prompt id, one bar per ``groups`` entry
    ``(label, {metric: float (len(ids),), NaN = missing})`` (e.g. one per bit rate).  Each value axis is
    zoomed to its data (:func:`value_range`); the legend sits above the panels.  Returns the Figure."""
    fig = new_figure(max(6.0, 3.4 * len(metrics)), 4.2)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    width = 0.8 / max(1, len(groups))
    x = np.arange(len(ids))
    for ax, metric in zip(axes, metrics):
        shown = []
        for j, (label, values) in enumerate(groups):
            vals = _finite(values.get(metric, [np.nan] * len(ids)))
            shown += list(vals)
            ax.bar(x + (j - (len(groups) - 1) / 2) * width, vals, width, label=label)
        ax.set_ylim(*value_range(shown, metric))
        ax.set_xticks(x, list(ids), fontsize=7)
        ax.set_xlabel("prompt")
        ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    if len(groups) > 1:
        _legend_above(fig, axes)
    return fig


def rate_quality(lines: dict[str, Sequence[tuple[float, dict]]], metrics: Sequence[str],
                 xlabel: str = "bits per weight (all stored bits / weights)", title: str | None = None,
                 references: dict[str, float] | None = None):
    """Rate–quality: one panel per metric, one line per ``lines`` entry ``name -> [(bits per weight,
    {metric: value | None}), ...]`` (points sorted by rate; missing values skipped).  The legend (the
    line names) sits above the panels when there is more than one line; ``title`` (e.g. the model) goes below
    the panels.  ``references`` maps a metric to the unquantized reference's value, drawn as a dashed
    horizontal line in that panel.  Returns the Figure."""
    fig = new_figure(max(6.0, 3.6 * len(metrics)), 3.9)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    markers = "osD^v<>ph*"
    for ax, metric in zip(axes, metrics):
        shown = []
        for n, (name, pts) in enumerate(lines.items()):
            xy = sorted((float(b), float(v[metric])) for b, v in pts
                        if v.get(metric) is not None and math.isfinite(float(v[metric])) and b is not None)
            shown += [y for _, y in xy]
            ax.plot([b for b, _ in xy], [y for _, y in xy], marker=markers[n % len(markers)], label=name)
        ref = (references or {}).get(metric)
        if ref is not None and math.isfinite(ref):
            ax.axhline(ref, color="0.3", ls="--", lw=1.0)
            ax.annotate("unquantized reference", (0.02, ref), xycoords=("axes fraction", "data"), fontsize=7,
                        color="0.3", va="bottom")
            shown.append(ref)
        ax.set_ylim(*value_range(shown, metric))
        ax.set_xlabel(xlabel, fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=9)
        ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        _legend_above(fig, axes)
    if title:  # wrapped to the figure's width (about 14 characters per inch at this size)
        fig.supxlabel(textwrap.fill(title, max(40, int(fig.get_figwidth() * 14))), fontsize=9)
    return fig
