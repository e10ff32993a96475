"""Artifacts of an evaluation run: frames.npz, side-by-side mp4s, JSON/CSV and a self-contained
HTML report.  Inputs are plain Python / numpy objects; nothing here runs a model.

Every writer is atomic: it writes a temporary file in the destination directory and then
``os.replace``-s it, so a crash never leaves a half-written artifact under the final name.

Report dict schema (input of ``write_html_report``; also what the runner saves as report.json)
---------------------------------------------------------------------------------------------
::

    {
      "model": str,                         # e.g. "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
      "config": {str: any},                 # run configuration, shown as a key/value table
      "compression": {str: any},            # name -> value (e.g. "bits per weight": 2.1)
      "bps_list": [float, ...],             # bit rates evaluated, in display order
      "prompts": [                          # one entry per (prompt, seed, bps)
        {
          "prompt": str, "seed": int, "bps": float,
          "per_frame": {
            "psnr":  [float, ...],          # (F,)  dB, +inf for identical frames
            "ssim":  [float, ...],          # (F,)
            "lpips": [float, ...] | None,   # (F,)  None when LPIPS is unavailable
            "flicker_psnr": [float, ...],   # (F-1,) dB
          },
          "means": {"psnr": float|None, "ssim": ..., "lpips": ..., "flicker_psnr": ...},
                                            # optional; = prompt_means(per_frame) if missing
          "audio_snr_db": float | None,     # optional
          "video": "relative/path.mp4" | None,     # relative to the report.html directory
          "frames": "relative/frames.npz" | None,  # relative to the report.html directory
        }, ...
      ],
      "suite": {bps_key(bps): {...}},       # optional; = suite_aggregates(prompts) if missing
      "lpips": {"available": bool, "reason": str | None, "plumbing": bool (optional)},
    }

``suite[bps_key(bps)]`` (see ``suite_aggregates``) is::

    {"bps": float, "n_prompts": int,
     "psnr": summary, "ssim": summary, "lpips": summary | None, "flicker_psnr": summary,
     "audio_snr_db": summary | None,
     "worst_prompt": {"index": int, "prompt": str, "seed": int, "psnr": float|None,
                      "ssim": ..., "lpips": ...} | None}

where ``summary`` is ``metrics.summarize`` over the per-prompt means (mean / median / min /
max across prompts, plus inf/NaN counts), and the worst prompt is the one with the lowest mean
PSNR.  Suite keys are strings (``bps_key``: ``"%g" % bps``, ``"none"`` for ``bps=None``) so the
dict survives a JSON round trip unchanged.

Non-finite numbers
------------------
A per-prompt mean is the mean over the finite per-frame values (``metrics.summarize``), ``None``
when there are none (e.g. all frames identical, PSNR = +inf).  For worst-prompt selection a
``None`` PSNR mean with infinite frames counts as +inf (best).  ``write_json_atomic`` writes
``+inf`` / ``-inf`` as the strings ``"inf"`` / ``"-inf"`` and NaN as ``null``; ``summarize`` /
``prompt_means`` accept those spellings back.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import subprocess
import tempfile
import wave
from contextlib import contextmanager
from typing import Any, Callable, Iterable
from urllib.parse import quote

import numpy as np

from . import metrics as _m

__all__ = [
    "write_frames_npz",
    "write_side_by_side_mp4",
    "error_maps",
    "side_by_side_frames",
    "write_json_atomic",
    "write_csv_atomic",
    "write_bytes_atomic",
    "write_html_report",
    "suite_aggregates",
    "prompt_means",
    "bps_key",
    "to_jsonable",
]

METRICS = ("psnr", "ssim", "lpips", "flicker_psnr")
_MIN_VIDEO_HEIGHT = 128


# --------------------------------------------------------------------------- atomic files
@contextmanager
def _atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temp path in ``path``'s directory; on success ``os.replace`` it onto ``path``."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _write_bytes_atomic(path: str | os.PathLike, writer: Callable[[io.BufferedWriter], None]) -> str:
    with _atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
    return os.fspath(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` (parent directories created).  Atomic.  Returns the path."""
    return _write_bytes_atomic(path, lambda fh: fh.write(data))


def write_frames_npz(path: str | os.PathLike, ref: np.ndarray, quant: np.ndarray,
                     compress: bool = True) -> str:
    """Write ``path`` (e.g. ``.../frames.npz``) holding uint8 arrays ``ref`` and ``quant`` of shape
    (F, H, W, 3).  Atomic.  ``compress`` uses ``np.savez_compressed``.  Returns the path."""
    _m._check_frames(ref, quant, "write_frames_npz")
    saver = np.savez_compressed if compress else np.savez
    return _write_bytes_atomic(path, lambda fh: saver(fh, ref=ref, quant=quant))


def to_jsonable(obj: Any) -> Any:
    """Recursively convert to JSON-safe Python: numpy arrays/scalars -> lists/numbers, tuples ->
    lists, paths -> str, dict keys -> str, +inf/-inf -> "inf"/"-inf", NaN -> None."""
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (float, np.floating)) else _fmt_key(k): to_jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()] if obj.ndim else to_jsonable(obj.item())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if math.isnan(f):
            return None
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _fmt_key(k: float) -> str:
    return "%g" % float(k)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> str:
    """Write ``obj`` as JSON (via ``to_jsonable``: inf -> "inf", NaN -> null).  Atomic."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    return write_bytes_atomic(path, text.encode("utf-8") + b"\n")


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple, np.ndarray)):
        return json.dumps(to_jsonable(v), allow_nan=False)
    v = to_jsonable(v)
    return repr(v) if isinstance(v, float) else v


def write_csv_atomic(path: str | os.PathLike, rows: list[dict]) -> str:
    """Write ``rows`` as CSV with a header: the union of the rows' keys in first-seen order.
    Missing / None cells are empty, floats keep full precision (``repr``), +/-inf are written
    as "inf"/"-inf", lists/dicts as JSON.  Atomic.  No rows -> an empty file."""
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    buf = io.StringIO()
    if cols:
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_cell(r.get(k)) for k in cols})
    return write_bytes_atomic(path, buf.getvalue().encode("utf-8"))


# --------------------------------------------------------------------------- video
def error_maps(ref: np.ndarray, quant: np.ndarray, gain: float = 4.0,
               colormap: str | None = "inferno") -> np.ndarray:
    """Amplified absolute-error frames.

    Args:
        ref, quant: uint8 (F, H, W, 3).
        gain: multiplier applied to |ref - quant| before clipping to 0..255.
        colormap: matplotlib colormap name: the per-pixel error (mean over RGB of
            |ref - quant|, times gain, clipped) is mapped through it.  ``None`` returns the
            per-channel error ``clip(|ref - quant| * gain, 0, 255)`` as RGB instead.
    Returns:
        uint8 (F, H, W, 3).
    """
    _m._check_frames(ref, quant, "error_maps")
    if not (gain > 0 and math.isfinite(gain)):
        raise ValueError(f"error_maps: gain must be a positive finite number, got {gain!r}")
    err = np.abs(ref.astype(np.int16) - quant.astype(np.int16)).astype(np.float32)
    if colormap is None:
        return np.clip(np.rint(err * gain), 0, 255).astype(np.uint8)
    import matplotlib

    lut = (matplotlib.colormaps[colormap](np.arange(256))[:, :3] * 255.0).round().astype(np.uint8)
    idx = np.clip(np.rint(err.mean(axis=-1) * gain), 0, 255).astype(np.uint8)
    return lut[idx]


def side_by_side_frames(ref: np.ndarray, quant: np.ndarray, error_gain: float = 4.0,
                        min_height: int = _MIN_VIDEO_HEIGHT,
                        colormap: str | None = "inferno") -> np.ndarray:
    """Compose ``ref | quant | error map`` per frame, as written to the mp4.

    Each panel is upscaled by the integer nearest-neighbour factor ``ceil(min_height / H)``
    (1 for frames at least ``min_height`` high) and padded (edge replication) by at most one
    pixel to even height and width, so the output is yuv420p-friendly and exactly 3 panels wide.

    Returns:
        uint8 (F, Hp, 3 * Wp, 3) with (Hp, Wp) the padded, scaled panel size.
    """
    err = error_maps(ref, quant, error_gain, colormap)
    f, h, w, _ = ref.shape
    s = max(1, math.ceil(min_height / h))
    ph, pw = h * s + (h * s) % 2, w * s + (w * s) % 2

    def panel(x: np.ndarray) -> np.ndarray:
        if s > 1:
            x = np.repeat(np.repeat(x, s, axis=1), s, axis=2)
        if x.shape[1] != ph or x.shape[2] != pw:
            x = np.pad(x, ((0, 0), (0, ph - x.shape[1]), (0, pw - x.shape[2]), (0, 0)), mode="edge")
        return x

    return np.ascontiguousarray(np.concatenate([panel(ref), panel(quant), panel(err)], axis=2))


def _write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM wav from float audio in [-1, 1] (clipped), shape (T,) or (C, T)."""
    a = np.asarray(audio, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    pcm = np.clip(np.rint(a * 32767.0), -32768, 32767).astype("<i2").T  # (T, C) interleaved
    with wave.open(path, "wb") as w:
        w.setnchannels(a.shape[0])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(np.ascontiguousarray(pcm).tobytes())


def _check_audio(audio: Any, sample_rate: Any) -> np.ndarray:
    a = np.asarray(audio)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"audio must be a float array in [-1, 1], got dtype {a.dtype}")
    if a.ndim not in (1, 2) or a.shape[-1] == 0:
        raise ValueError(f"audio must have shape (T,) or (C, T), got {a.shape}")
    if a.ndim == 2 and not (1 <= a.shape[0] <= 8 and a.shape[0] < a.shape[1]):
        raise ValueError(f"audio of shape {a.shape} does not look like (C, T) channels-first "
                         f"with 1..8 channels; transpose (T, C) audio")
    if not np.all(np.isfinite(a)):
        raise ValueError("audio contains NaN/inf")
    if sample_rate is None or int(sample_rate) <= 0:
        raise ValueError(f"audio_sample_rate must be a positive int when audio is given, "
                         f"got {sample_rate!r}")
    return a


def write_side_by_side_mp4(path: str | os.PathLike, ref: np.ndarray, quant: np.ndarray,
                           fps: float = 8, error_gain: float = 4.0,
                           audio: np.ndarray | None = None,
                           audio_sample_rate: int | None = None,
                           quality: float = 8, min_height: int = _MIN_VIDEO_HEIGHT,
                           colormap: str | None = "inferno") -> str:
    """Write an H.264 (libx264, yuv420p) mp4 whose frames are ``ref | quant | error map``
    (see ``side_by_side_frames``: tiny frames are nearest-upscaled to >= ``min_height`` px high;
    the error map is ``|ref - quant| * error_gain`` through ``colormap``).

    Args:
        ref, quant: uint8 (F, H, W, 3).
        fps: frame rate.
        audio: optional float audio in [-1, 1], shape (T,) mono or (C, T); muxed as AAC with
            the ffmpeg binary of imageio-ffmpeg (via a temporary 16-bit wav).
        audio_sample_rate: required with ``audio``.
        quality: imageio quality 0..10 (10 best; 8 = libx264 crf ~10).
    Returns the path.  Atomic (temporary files live next to ``path``).
    """
    _m._check_frames(ref, quant, "write_side_by_side_mp4")
    if not (fps > 0):
        raise ValueError(f"write_side_by_side_mp4: fps must be > 0, got {fps!r}")
    if audio is not None:
        audio = _check_audio(audio, audio_sample_rate)
    import imageio.v2 as iio

    with _atomic_path(path, suffix=".mp4") as tmp_video:
        writer = iio.get_writer(tmp_video, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1, quality=quality,
                                ffmpeg_log_level="error")
        try:
            for i in range(ref.shape[0]):  # one frame at a time: bounded memory for long videos
                writer.append_data(side_by_side_frames(ref[i:i + 1], quant[i:i + 1], error_gain,
                                                       min_height, colormap)[0])
        finally:
            writer.close()
        if audio is not None:
            _mux_audio(tmp_video, audio, int(audio_sample_rate))
    return os.fspath(path)


def _mux_audio(video_path: str, audio: np.ndarray, sample_rate: int) -> None:
    """Replace ``video_path`` (in place) by the video stream plus ``audio`` as AAC."""
    import imageio_ffmpeg

    d = os.path.dirname(os.path.abspath(video_path))
    fd, wav = tempfile.mkstemp(dir=d, prefix=".audio.", suffix=".wav")
    os.close(fd)
    fd, muxed = tempfile.mkstemp(dir=d, prefix=".muxed.", suffix=".mp4")
    os.close(fd)
    try:
        _write_wav(wav, audio, sample_rate)
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
               "-i", video_path, "-i", wav, "-map", "0:v:0", "-map", "1:a:0",
               "-c:v", "copy", "-c:a", "aac", "-b:a", "192k", "-movflags", "+faststart", muxed]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg audio mux failed ({proc.returncode}): {proc.stderr.strip()}")
        os.replace(muxed, video_path)
    finally:
        for p in (wav, muxed):
            if os.path.exists(p):
                os.remove(p)


# --------------------------------------------------------------------------- aggregation
def bps_key(bps: Any) -> str:
    """String key used for ``report["suite"]``: ``"%g" % bps`` ("2", "2.5"), "none" for None."""
    return "none" if bps is None else _fmt_key(bps)


def _num(v: Any) -> float | None:
    """Float from a number or its JSON spelling; None stays None."""
    if v is None:
        return None
    return float(v)


def prompt_means(per_frame: dict) -> dict:
    """``{metric: summarize(per_frame[metric])["mean"]}`` for psnr / ssim / lpips /
    flicker_psnr; None for a missing / None metric or one with no finite value."""
    out = {}
    for k in METRICS:
        v = per_frame.get(k)
        out[k] = None if v is None else _m.summarize(v)["mean"]
    return out


def _content_cell(c: dict | None) -> str:
    """``"100% / 50%"`` from an entry's content record (eval/content.check_pair), an en dash without one."""
    if not c:
        return "\u2013"
    return " / ".join(f"{100 * float(c[side]['agreement']):.0f}%" for side in ("ref", "quant"))


def _entry_means(e: dict) -> dict:
    means = e.get("means")
    if means is None:
        means = prompt_means(e.get("per_frame", {}))
    return means


def _psnr_rank(e: dict) -> float:
    """Sort key for worst-prompt selection: mean PSNR; all-inf (identical) -> +inf; no data -> nan."""
    v = _num(_entry_means(e).get("psnr"))
    if v is not None:
        return v
    pf = (e.get("per_frame") or {}).get("psnr")
    if pf is not None and _m.summarize(pf)["n_inf"] > 0:
        return math.inf
    return math.nan


def suite_aggregates(prompt_entries: list[dict]) -> dict:
    """The ``report["suite"]`` part: per bps, summaries across prompts of the per-prompt means,
    and the worst prompt (lowest mean PSNR).  See the module docstring for the layout.

    Args:
        prompt_entries: ``report["prompts"]``-style dicts; ``means`` is computed from
            ``per_frame`` when absent.
    Returns:
        ``{bps_key(bps): {...}}`` in order of first appearance.
    """
    groups: dict[str, list[tuple[int, dict]]] = {}
    bps_of: dict[str, Any] = {}
    for i, e in enumerate(prompt_entries):
        k = bps_key(e.get("bps"))
        groups.setdefault(k, []).append((i, e))
        bps_of[k] = e.get("bps")
    suite = {}
    for k, items in groups.items():
        means = [_entry_means(e) for _, e in items]
        s: dict[str, Any] = {"bps": None if bps_of[k] is None else float(bps_of[k]),
                             "n_prompts": len(items)}
        for metric in METRICS:
            vals = [mm.get(metric) for mm in means]
            s[metric] = None if all(v is None for v in vals) else _m.summarize(vals)
        audio = [e.get("audio_snr_db") for _, e in items]
        s["audio_snr_db"] = None if all(v is None for v in audio) else _m.summarize(audio)
        ranked = [(r, i, e) for i, e in items if not math.isnan(r := _psnr_rank(e))]
        if ranked:
            _, i, e = min(ranked, key=lambda t: (t[0], t[1]))
            mm = _entry_means(e)
            s["worst_prompt"] = {"index": i, "prompt": e.get("prompt"), "seed": e.get("seed"),
                                 **{m: _num(mm.get(m)) for m in ("psnr", "ssim", "lpips")}}
        else:
            s["worst_prompt"] = None
        suite[k] = s
    return suite


# --------------------------------------------------------------------------- HTML
def _fig():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _finite_or_nan(values: Iterable) -> np.ndarray:
    a = _m._as_float_array(list(values))
    a[~np.isfinite(a)] = np.nan
    return a


def _short(s: Any, n: int = 40) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def _fmt(v: Any, digits: int = 4) -> str:
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


def _plot_per_frame(entries: list[tuple[int, dict]], title: str):
    fig = _fig()
    fig.set_size_inches(9, 6)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for i, e in entries:
        pf = e.get("per_frame") or {}
        label = f"P{i}: {_short(e.get('prompt'), 30)}"
        if pf.get("psnr") is not None:
            y = _finite_or_nan(pf["psnr"])
            ax1.plot(np.arange(len(y)), y, marker=".", label=label)
        if pf.get("ssim") is not None:
            y = _finite_or_nan(pf["ssim"])
            ax2.plot(np.arange(len(y)), y, marker=".", label=label)
    ax1.set_ylabel("PSNR (dB)")
    ax1.set_title(title + "  (identical frames, PSNR = \u221e, are not drawn)", fontsize=9)
    ax2.set_ylabel("SSIM")
    ax2.set_xlabel("frame")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
    if len(entries) <= 12:
        ax1.legend(fontsize=7, loc="best")
    return fig


def _plot_per_prompt_bars(prompts: list[dict], bps_list: list, has_lpips: bool):
    metrics = ["psnr", "ssim"] + (["lpips"] if has_lpips else [])
    labels = {"psnr": "mean PSNR (dB)", "ssim": "mean SSIM", "lpips": "mean LPIPS (lower=better)"}
    # prompt identity = (prompt, seed); bars grouped by bps
    ids: list[tuple] = []
    for e in prompts:
        pid = (e.get("prompt"), e.get("seed"))
        if pid not in ids:
            ids.append(pid)
    fig = _fig()
    fig.set_size_inches(max(6.0, 3.2 * len(metrics)), 3.8)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    keys = [bps_key(b) for b in bps_list] or sorted({bps_key(e.get("bps")) for e in prompts})
    width = 0.8 / max(1, len(keys))
    x = np.arange(len(ids))
    for ax, metric in zip(axes, metrics):
        for j, k in enumerate(keys):
            vals = np.full(len(ids), np.nan)
            for e in prompts:
                if bps_key(e.get("bps")) == k:
                    v = _num(_entry_means(e).get(metric))
                    if v is not None:
                        vals[ids.index((e.get("prompt"), e.get("seed")))] = v
            ax.bar(x + (j - (len(keys) - 1) / 2) * width, vals, width, label=f"{k} bps")
        ax.set_xticks(x, [f"S{n}" for n in range(len(ids))], fontsize=7)
        ax.set_title(labels[metric], fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    if len(keys) > 1:
        axes[0].legend(fontsize=7)
    return fig, ids


def _plot_rate_quality(suite: dict, bps_list: list, has_lpips: bool):
    metrics = ["psnr", "ssim"] + (["lpips"] if has_lpips else [])
    names = {"psnr": "mean PSNR (dB)", "ssim": "mean SSIM", "lpips": "mean LPIPS"}
    fig = _fig()
    fig.set_size_inches(max(6.0, 3.2 * len(metrics)), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    pts = [(float(b), suite.get(bps_key(b)) or {}) for b in bps_list if b is not None]
    pts.sort(key=lambda t: t[0])
    for ax, metric in zip(axes, metrics):
        xy = [(b, s[metric]["mean"]) for b, s in pts if s.get(metric) and s[metric].get("mean") is not None]
        ax.plot([b for b, _ in xy], [y for _, y in xy], marker="o")
        ax.set_xlabel("bits per weight (bps)")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(names[metric], fontsize=9)
        ax.grid(True, alpha=0.3)
    return fig


def _kv_table(d: dict, cls: str) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_kv_value(v))}</td></tr>"
        for k, v in (d or {}).items())
    return f'<table class="{cls}">{rows}</table>'


def _kv_value(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(to_jsonable(v))
    if isinstance(v, (float, np.floating)):
        return _fmt(v, 6).rstrip("0").rstrip(".") if math.isfinite(float(v)) else _fmt(v)
    return str(v)


def _rel_link(p: str) -> str:
    return html.escape(quote(str(p).replace(os.sep, "/"), safe="/:#?=&%"), quote=True)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.2em}
th,td{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img.plot{max-width:100%;border:1px solid #eee;margin:.4em 0}
video{max-width:480px}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:.4em .8em}
"""


def write_html_report(path: str | os.PathLike, report: dict,
                      plots_dir_or_inline: str | os.PathLike | None = "inline") -> str:
    """Write a report.html for ``report`` (schema: module docstring).

    Args:
        path: output html file; ``video`` / ``frames`` paths in the report are used as given
            (relative to this file's directory).
        report: the report dict.  ``suite`` is computed with ``suite_aggregates`` if missing.
        plots_dir_or_inline: ``"inline"`` or None (default) embeds the plots as base64 PNG
            data URIs, making the html self-contained (apart from the linked videos); a
            directory path instead writes the PNGs there and references them by relative path.
    Plot images carry ``class="plot"``, an ``id`` (``plot-per-frame-<bps>``, ``plot-per-prompt``,
    ``plot-rate-quality``) and alt text.  Atomic.  Returns the path.
    """
    if not isinstance(report, dict) or not isinstance(report.get("prompts"), list):
        raise ValueError("write_html_report: report must be a dict with a 'prompts' list "
                         "(see hq_diffusion.eval.report module docstring)")
    path = os.fspath(path)
    html_dir = os.path.dirname(os.path.abspath(path))
    inline = plots_dir_or_inline is None or plots_dir_or_inline == "inline"
    if not inline:
        os.makedirs(os.fspath(plots_dir_or_inline), exist_ok=True)

    prompts: list[dict] = report["prompts"]
    bps_list = list(report.get("bps_list") or [])
    for e in prompts:
        if e.get("bps") not in bps_list:
            bps_list.append(e.get("bps"))
    suite = report.get("suite") or suite_aggregates(prompts)
    lp = report.get("lpips") or {}
    has_lpips = any(_num(_entry_means(e).get("lpips")) is not None for e in prompts)

    def img(fig, pid: str, alt: str) -> str:
        data = _png(fig)
        if inline:
            src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        else:
            fn = os.path.join(os.fspath(plots_dir_or_inline), pid + ".png")
            write_bytes_atomic(fn, data)
            src = _rel_link(os.path.relpath(os.path.abspath(fn), html_dir))
        return (f'<img class="plot" id="{html.escape(pid, quote=True)}" '
                f'alt="{html.escape(alt, quote=True)}" src="{src}">')

    out: list[str] = []
    title = f"hq-diffusion evaluation: {report.get('model', '')}"
    out.append(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
               f"</title><style>{_CSS}</style></head><body>")
    out.append(f"<h1>{html.escape(title)}</h1>")
    out.append(f"<p>Model: <b id='model'>{html.escape(str(report.get('model', '')))}</b></p>")
    out.append("<h2>Compression</h2>" + _kv_table(report.get("compression") or {}, "compression"))
    out.append("<h2>Configuration</h2>" + _kv_table(report.get("config") or {}, "config"))
    if lp and not lp.get("available", False):
        out.append(f"<p class='warn' id='lpips-status'>LPIPS not computed: "
                   f"{html.escape(str(lp.get('reason')))}</p>")
    elif lp.get("plumbing"):
        out.append("<p class='warn' id='lpips-status'>LPIPS computed with PLUMBING (random "
                   "backbone) weights: the LPIPS numbers are not perceptual-quality numbers.</p>")

    # suite table
    out.append("<h2>Suite summary</h2><p>Statistics across prompts of the per-prompt means "
               "(finite frames only; \u221e = identical frames).</p>")
    out.append("<table class='suite' id='suite-table'><tr><th>bps</th><th>metric</th>"
               "<th>mean</th><th>median</th><th>min</th><th>max</th><th>prompts</th>"
               "<th>worst prompt (lowest mean PSNR)</th></tr>")
    for k, s in suite.items():
        worst = s.get("worst_prompt")
        worst_s = (f"P{worst['index']}: {html.escape(_short(worst.get('prompt'), 60))} "
                   f"(seed {html.escape(str(worst.get('seed')))}, PSNR {_fmt(worst.get('psnr'))})"
                   if worst else "\u2013")
        rows = [m for m in ("psnr", "ssim", "lpips", "flicker_psnr", "audio_snr_db") if s.get(m)]
        for j, metric in enumerate(rows):
            sm = s[metric]
            out.append("<tr>" + (f"<td rowspan='{len(rows)}'>{html.escape(k)}</td>" if j == 0 else "")
                       + f"<td>{metric}</td>"
                       + "".join(f"<td class='num'>{_fmt(sm.get(x))}</td>"
                                 for x in ("mean", "median", "min", "max"))
                       + f"<td class='num'>{s.get('n_prompts')}</td>"
                       + (f"<td rowspan='{len(rows)}'>{worst_s}</td>" if j == 0 else "") + "</tr>")
    out.append("</table>")

    # plots
    out.append("<h2>Plots</h2>")
    if len([b for b in bps_list if b is not None]) > 1:
        out.append("<h3>Rate\u2013quality</h3>")
        out.append(img(_plot_rate_quality(suite, bps_list, has_lpips), "plot-rate-quality",
                       "Rate-quality curve: suite mean PSNR/SSIM/LPIPS versus bits per weight"))
    for b in bps_list:
        k = bps_key(b)
        entries = [(i, e) for i, e in enumerate(prompts) if bps_key(e.get("bps")) == k]
        if not entries:
            continue
        out.append(f"<h3>Per-frame PSNR / SSIM, {html.escape(k)} bps</h3>")
        out.append(img(_plot_per_frame(entries, f"{k} bps"), f"plot-per-frame-{k}",
                       f"Per-frame PSNR and SSIM curves, one line per prompt, {k} bps"))
    if prompts:
        fig, ids = _plot_per_prompt_bars(prompts, bps_list, has_lpips)
        out.append("<h3>Per-prompt means</h3>")
        out.append(img(fig, "plot-per-prompt",
                       "Per-prompt bar chart of mean PSNR, SSIM" + (" and LPIPS" if has_lpips else "")))
        out.append("<table class='legend'><tr><th>bar</th><th>prompt</th><th>seed</th></tr>"
                   + "".join(f"<tr><td>S{n}</td><td>{html.escape(str(p))}</td>"
                             f"<td>{html.escape(str(sd))}</td></tr>" for n, (p, sd) in enumerate(ids))
                   + "</table>")

    # per-prompt table
    out.append("<h2>Per prompt</h2><p>Videos: reference | quantized | amplified |error|.</p>")
    out.append("<table class='prompts' id='prompt-table'><tr><th>#</th><th>prompt</th>"
               "<th>seed</th><th>bps</th><th>PSNR</th><th>SSIM</th><th>LPIPS</th>"
               "<th>flicker PSNR</th><th>audio SNR (dB)</th><th title='content check: object colour and "
               "direction vs the prompt (reference / quantized)'>content agreement (ref / quant)</th>"
               "<th>video</th><th>frames</th></tr>")
    for i, e in enumerate(prompts):
        mm = _entry_means(e)
        video = e.get("video")
        vcell = (f"<video controls preload='metadata' src='{_rel_link(video)}'></video><br>"
                 f"<a class='video-link' href='{_rel_link(video)}'>{html.escape(str(video))}</a>"
                 if video else "\u2013")
        frames = e.get("frames")
        fcell = (f"<a class='frames-link' href='{_rel_link(frames)}'>{html.escape(str(frames))}</a>"
                 if frames else "\u2013")
        out.append(f"<tr id='prompt-{i}'><td>P{i}</td><td>{html.escape(str(e.get('prompt')))}</td>"
                   f"<td>{html.escape(str(e.get('seed')))}</td><td>{html.escape(bps_key(e.get('bps')))}</td>"
                   + "".join(f"<td class='num'>{_fmt(mm.get(m))}</td>" for m in METRICS)
                   + f"<td class='num'>{_fmt(e.get('audio_snr_db'), 2)}</td>"
                   f"<td class='num'>{_content_cell(e.get('content'))}</td>"
                   f"<td>{vcell}</td><td>{fcell}</td></tr>")
    out.append("</table></body></html>\n")
    return write_bytes_atomic(path, "\n".join(out).encode("utf-8"))
