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
from typing import Any, Callable

import numpy as np

from . import metrics as _m
from . import page as _pg

__all__ = [
    "write_frames_npz",
    "write_side_by_side_mp4",
    "error_maps",
    "auto_error_gain",
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
#: error-map gains :func:`auto_error_gain` chooses from (largest first)
ERROR_GAINS = (64, 32, 16, 8, 4)
#: the error level (of 255) that the 99th percentile of a video's error is mapped to, at most
ERROR_P99_TARGET = 192
#: colour map of the error panel (perceptually uniform; 0 = black, full scale = pale yellow)
ERROR_COLORMAP = "inferno"


def auto_error_gain(ref: np.ndarray, quant: np.ndarray) -> int:
    """The error-map gain of one video: the largest of :data:`ERROR_GAINS` (64 … 4) for which the 99th
    percentile of the per-pixel error (mean over RGB of ``|ref - quant|``, over all frames) times the gain
    stays at or below :data:`ERROR_P99_TARGET`; 4 when even that saturates.  A small error (a near-lossless
    rate) is amplified more than a large one, so the panel is never a near-black rectangle; the report
    states the gain of every video.

    Args:
        ref, quant: uint8 (F, H, W, 3).
    Returns:
        int gain.
    """
    _m._check_frames(ref, quant, "auto_error_gain")
    err = np.abs(ref.astype(np.int16) - quant.astype(np.int16)).mean(axis=-1, dtype=np.float32)
    p99 = float(np.percentile(err, 99))
    fits = [g for g in ERROR_GAINS if p99 * g <= ERROR_P99_TARGET]
    return int(max(fits)) if fits else int(min(ERROR_GAINS))


def error_maps(ref: np.ndarray, quant: np.ndarray, gain: float = 4.0,
               colormap: str | None = ERROR_COLORMAP) -> np.ndarray:
    """Amplified absolute-error frames.

    Args:
        ref, quant: uint8 (F, H, W, 3).
        gain: multiplier applied to |ref - quant| before clipping to 0..255 (:func:`auto_error_gain` picks one
            per video for the reports).
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


def side_by_side_frames(ref: np.ndarray, quant: np.ndarray, error_gain: float | None = None,
                        min_height: int = _MIN_VIDEO_HEIGHT,
                        colormap: str | None = ERROR_COLORMAP) -> np.ndarray:
    """Compose ``ref | quant | error map`` per frame, as written to the mp4.

    ``error_gain`` None: :func:`auto_error_gain` of these frames.  Each panel is upscaled by the integer
    nearest-neighbour factor ``ceil(min_height / H)`` (1 for frames at least ``min_height`` high) and padded
    (edge replication) by at most one pixel to even height and width, so the output is yuv420p-friendly and
    exactly 3 panels wide.

    Returns:
        uint8 (F, Hp, 3 * Wp, 3) with (Hp, Wp) the padded, scaled panel size.
    """
    gain = auto_error_gain(ref, quant) if error_gain is None else error_gain
    err = error_maps(ref, quant, gain, colormap)
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
                           fps: float = 8, error_gain: float | None = None,
                           audio: np.ndarray | None = None,
                           audio_sample_rate: int | None = None,
                           quality: float = 8, min_height: int = _MIN_VIDEO_HEIGHT,
                           colormap: str | None = ERROR_COLORMAP, quant_only: bool = False) -> str:
    """Write an H.264 (libx264, yuv420p) mp4 whose frames are ``ref | quant | error map`` (``quant_only``: the
    quantized panel alone, for a run without a float reference; pass ``quant`` as ``ref`` too)
    (see ``side_by_side_frames``: tiny frames are nearest-upscaled to >= ``min_height`` px high;
    the error map is ``|ref - quant| * error_gain`` through ``colormap``; ``error_gain`` None: one gain for
    the whole video, :func:`auto_error_gain`).

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
    if error_gain is None:
        error_gain = auto_error_gain(ref, quant)
    import imageio.v2 as iio

    with _atomic_path(path, suffix=".mp4") as tmp_video:
        writer = iio.get_writer(tmp_video, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1, quality=quality,
                                ffmpeg_log_level="error")
        try:
            for i in range(ref.shape[0]):  # one frame at a time: bounded memory for long videos
                row = side_by_side_frames(ref[i:i + 1], quant[i:i + 1], error_gain, min_height, colormap)[0]
                third = row.shape[1] // 3
                writer.append_data(np.ascontiguousarray(row[:, third:2 * third]) if quant_only else row)
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
    return " / ".join(f"{100 * float(c[side]['agreement']):.0f}%" if c.get(side) else "\u2013"
                      for side in ("ref", "quant"))


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
def _kv_table(d: dict, cls: str) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_kv_value(v))}</td></tr>"
        for k, v in (d or {}).items())
    return f'<table class="{cls}">{rows}</table>'


def _kv_value(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(to_jsonable(v))
    if isinstance(v, (float, np.floating)):
        return _pg.fmt(v, 6).rstrip("0").rstrip(".") if math.isfinite(float(v)) else _pg.fmt(v)
    return str(v)


def _suite_table(suite: dict, prompts: list[dict], ids: list[str]) -> str:
    out = ["<h2>Suite summary</h2><p>Statistics across prompts of the per-prompt means "
           "(finite frames only; \u221e = identical frames).</p>",
           "<table class='suite' id='suite-table'><tr><th>bps</th><th>metric</th>"
           "<th>mean</th><th>median</th><th>min</th><th>max</th><th>prompts</th>"
           "<th>worst prompt (lowest mean PSNR)</th></tr>"]
    for k, s in suite.items():
        worst = s.get("worst_prompt")
        wid = ids[worst["index"]] if worst and 0 <= worst["index"] < len(ids) else "?"
        worst_s = (f"{wid}: {html.escape(_pg.short(worst.get('prompt'), 60))} "
                   f"(seed {html.escape(str(worst.get('seed')))}, PSNR {_pg.fmt(worst.get('psnr'))})"
                   if worst else "\u2013")
        rows = [m for m in ("psnr", "ssim", "lpips", "flicker_psnr", "audio_snr_db") if s.get(m)]
        agree = [a for e in prompts if bps_key(e.get("bps")) == k and (a := _pg.agreement(e)) is not None]
        cells = [(m, s[m]) for m in rows] + ([("agreement", _m.summarize(agree))] if agree else [])
        for j, (metric, sm) in enumerate(cells):
            out.append("<tr>" + (f"<td rowspan='{len(cells)}'>{html.escape(k)}</td>" if j == 0 else "")
                       + f"<td>{metric}</td>"
                       + "".join(f"<td class='num'>{_pg.fmt(sm.get(x))}</td>" for x in ("mean", "median", "min", "max"))
                       + f"<td class='num'>{s.get('n_prompts')}</td>"
                       + (f"<td rowspan='{len(cells)}'>{worst_s}</td>" if j == 0 else "") + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _stills(prompts: list[dict], ids: list[str], suite: dict, bps_list: list, imgs: _pg.Images,
            html_dir: str) -> str:
    """Per bit rate, the middle frame of its worst prompt: reference | quantized | error map (× gain)."""
    out = ["<h2>What the error looks like</h2><p class='note'>Per bit rate, the middle frame of the prompt "
           "with the lowest mean PSNR: reference | quantized | error map (|difference| \u00d7 gain, inferno "
           "colours).</p>"]
    for b in bps_list:
        k = bps_key(b)
        worst = (suite.get(k) or {}).get("worst_prompt")
        if not worst or not (0 <= worst["index"] < len(prompts)):
            continue
        e = prompts[worst["index"]]
        pair = _pg.load_pair(html_dir, e.get("frames"))
        if isinstance(pair, str):
            out.append(f"<p class='warn' id='still-{html.escape(k)}'>{html.escape(k)} bps: still not shown "
                       f"({html.escape(pair)})</p>")
            continue
        ref, quant = pair
        gain = auto_error_gain(ref, quant)
        mid = ref.shape[0] // 2
        panel = side_by_side_frames(ref[mid:mid + 1], quant[mid:mid + 1], gain)[0]
        cap = (f"{k} bps, {ids[worst['index']]} (seed {e.get('seed')}), frame {mid}: reference | quantized | "
               f"error \u00d7{gain}")
        out.append(f"<figure>{imgs.tag(_pg.png_rgb(panel), f'still-{k}', cap, cls='still')}"
                   f"<figcaption>{html.escape(cap)}</figcaption></figure>")
    return "\n".join(out)


def _plots(prompts: list[dict], ids: list[str], suite: dict, bps_list: list, has_lpips: bool,
           has_agreement: bool, imgs: _pg.Images) -> str:
    from . import plots as P

    metrics = ["psnr", "ssim"] + (["lpips"] if has_lpips else []) + (["agreement"] if has_agreement else [])
    out = ["<h2>Plots</h2>"]
    rated = [b for b in bps_list if b is not None]
    if len(rated) > 1:
        pts = []
        for b in sorted(rated, key=float):
            k = bps_key(b)
            s = suite.get(k) or {}
            vals = {m: (s.get(m) or {}).get("mean") for m in metrics if m != "agreement"}
            agree = [a for e in prompts if bps_key(e.get("bps")) == k and (a := _pg.agreement(e)) is not None]
            vals["agreement"] = float(np.mean(agree)) if agree else None
            pts.append((float(b), vals))
        out.append("<h3>Rate\u2013quality</h3>")
        out.append(imgs.tag(P.png_bytes(P.rate_quality({"suite mean": pts}, metrics,
                                                         xlabel="requested bits per weight")),
                            "plot-rate-quality", "Rate-quality curve: suite mean "
                            + "/".join(m.upper() for m in metrics) + " versus bits per weight"))
    for b in bps_list:
        k = bps_key(b)
        entries = sorted(((i, e) for i, e in enumerate(prompts) if bps_key(e.get("bps")) == k),
                         key=lambda t: _pg.id_order(ids[t[0]]))
        if not entries:
            continue
        curves = [(f"{ids[i]}: {_pg.short(e.get('prompt'), 30)}", (e.get("per_frame") or {}).get("psnr"),
                   (e.get("per_frame") or {}).get("ssim")) for i, e in entries]
        out.append(f"<h3>Per-frame PSNR / SSIM, {html.escape(k)} bps</h3>")
        out.append(imgs.tag(P.png_bytes(P.per_frame_curves(curves, f"{k} bps")), f"plot-per-frame-{k}",
                            f"Per-frame PSNR and SSIM curves, one line per prompt, {k} bps"))
    if prompts:
        order = sorted(set(ids), key=_pg.id_order)
        groups = []
        for b in bps_list:
            k = bps_key(b)
            vals = {m: np.full(len(order), np.nan) for m in metrics}
            for i, e in enumerate(prompts):
                if bps_key(e.get("bps")) != k:
                    continue
                mm = _entry_means(e)
                for m in metrics:
                    v = _pg.agreement(e) if m == "agreement" else _num(mm.get(m))
                    if v is not None:
                        vals[m][order.index(ids[i])] = v
            groups.append((f"{k} bps", vals))
        out.append("<h3>Per-prompt means</h3>")
        out.append(imgs.tag(P.png_bytes(P.per_prompt_bars(order, groups, metrics)), "plot-per-prompt",
                            "Per-prompt bar chart of mean " + ", ".join(m.upper() for m in metrics)
                            + ", one bar per bit rate"))
        first = {pid: prompts[ids.index(pid)] for pid in order}
        out.append("<table class='legend' id='prompt-ids'><tr><th>id</th><th>prompt</th><th>seed</th></tr>"
                   + "".join(f"<tr><td>{html.escape(pid)}</td><td>{html.escape(str(e.get('prompt')))}</td>"
                             f"<td>{html.escape(str(e.get('seed')))}</td></tr>" for pid, e in first.items())
                   + "</table>")
    return "\n".join(out)


def _prompt_table(prompts: list[dict], ids: list[str], has_agreement: bool, html_dir: str) -> str:
    out = ["<h2>Per prompt</h2><p>Videos: reference | quantized | error map (|difference| \u00d7 the gain "
           "in the \u2018error gain\u2019 column).</p>",
           "<table class='prompts' id='prompt-table'><tr><th>id</th><th>prompt</th>"
           "<th>seed</th><th>bps</th><th>PSNR</th><th>SSIM</th><th>LPIPS</th>"
           "<th>flicker PSNR</th>" + ("<th title='content check: object colour and direction vs the prompt'>"
                                      "content agreement (ref / quant)</th>" if has_agreement else "")
           + "<th>audio SNR (dB)</th><th>error gain</th><th>video</th><th>frames</th></tr>"]
    for i, e in enumerate(prompts):
        mm = _entry_means(e)
        video = e.get("video")
        vcell = (f"<video controls preload='metadata' src='{_pg.rel_link(video)}'></video><br>"
                 f"<a class='video-link' href='{_pg.rel_link(video)}'>{html.escape(str(video))}</a>"
                 if video else "\u2013")
        frames = e.get("frames")
        fcell = (f"<a class='frames-link' href='{_pg.rel_link(frames)}'>{html.escape(str(frames))}</a>"
                 if frames else "\u2013")
        pair = _pg.load_pair(html_dir, frames)
        gcell = "\u2013" if isinstance(pair, str) else f"\u00d7{auto_error_gain(*pair)}"
        out.append(f"<tr id='prompt-{i}'><td>{html.escape(ids[i])}</td><td>{html.escape(str(e.get('prompt')))}</td>"
                   f"<td>{html.escape(str(e.get('seed')))}</td><td>{html.escape(bps_key(e.get('bps')))}</td>"
                   + "".join(f"<td class='num'>{_pg.fmt(mm.get(m))}</td>" for m in METRICS)
                   + (f"<td class='num'>{_content_cell(e.get('content')) if e.get('content') else _pg.fmt(_pg.agreement(e), 3)}</td>"
                      if has_agreement else "")
                   + f"<td class='num'>{_pg.fmt(e.get('audio_snr_db'), 2)}</td><td class='num'>{gcell}</td>"
                   f"<td>{vcell}</td><td>{fcell}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


NO_REFERENCE = "no float reference: PSNR/SSIM not computed"


def _quant_only_section(prompts: list[dict], ids: list[str]) -> str:
    """The page of a run without a float reference: the note, then per prompt its content agreement, the
    generation time and the quantized video (no PSNR/SSIM, no comparison plots)."""
    out = [f"<p class='warn' id='no-reference'>{html.escape(NO_REFERENCE[0].upper() + NO_REFERENCE[1:])} (no LPIPS, flicker or "
           "error maps either): this run generated with the quantized pipeline only. Give the float pipeline it "
           "was made from with --reference to compare.</p>",
           "<h2>Per prompt</h2><table class='prompts' id='prompt-table'><tr><th>id</th><th>prompt</th>"
           "<th>seed</th><th>bps</th><th>content agreement (quant)</th><th>generation (s)</th><th>video</th>"
           "<th>frames</th></tr>"]
    for i, e in enumerate(prompts):
        video, frames = e.get("video"), e.get("frames")
        vcell = (f"<video controls preload='metadata' src='{_pg.rel_link(video)}'></video>" if video else "\u2013")
        fcell = (f"<a class='frames-link' href='{_pg.rel_link(frames)}'>{html.escape(str(frames))}</a>"
                 if frames else "\u2013")
        out.append(f"<tr id='prompt-{i}'><td>{html.escape(ids[i])}</td><td>{html.escape(str(e.get('prompt')))}</td>"
                   f"<td>{html.escape(str(e.get('seed')))}</td><td>{html.escape(bps_key(e.get('bps')))}</td>"
                   f"<td class='num'>{_pg.fmt(_pg.agreement(e), 3)}</td>"
                   f"<td class='num'>{_pg.fmt(e.get('seconds'), 2)}</td><td>{vcell}</td><td>{fcell}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


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
    The page says which model made it and whether its weights are trained (:func:`model_info`), explains
    every metric and the error-map gain, names prompts by :func:`prompt_ids`, and shows per bit rate a still
    of the worst prompt with its error map.  Plot images carry ``class="plot"``, an ``id``
    (``plot-per-frame-<bps>``, ``plot-per-prompt``, ``plot-rate-quality``) and alt text; stills carry
    ``class="still"`` and ``id="still-<bps>"``.  Atomic.  Returns the path.
    """
    if not isinstance(report, dict) or not isinstance(report.get("prompts"), list):
        raise ValueError("write_html_report: report must be a dict with a 'prompts' list "
                         "(see hq_diffusion.eval.report module docstring)")
    path = os.fspath(path)
    html_dir = os.path.dirname(os.path.abspath(path))
    imgs = _pg.Images(html_dir, plots_dir_or_inline, write_bytes_atomic)

    prompts: list[dict] = report["prompts"]
    bps_list = list(report.get("bps_list") or [])
    for e in prompts:
        if e.get("bps") not in bps_list:
            bps_list.append(e.get("bps"))
    suite = report.get("suite") or suite_aggregates(prompts)
    lp = report.get("lpips") or {}
    has_lpips = any(_num(_entry_means(e).get("lpips")) is not None for e in prompts)
    has_agreement = any(_pg.agreement(e) is not None for e in prompts)
    ids = _pg.prompt_ids(prompts)

    out: list[str] = []
    title = f"hq-diffusion evaluation: {report.get('model', '')}"
    out.append(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
               f"</title><style>{_pg.CSS}</style></head><body>")
    out.append(f"<h1>{html.escape(title)}</h1>")
    out.append(_pg.model_banner(_pg.model_info(report.get("model", ""), report.get("config"))))
    out.append(_pg.explanations(has_agreement))
    out.append("<h2>Compression</h2>" + _kv_table(report.get("compression") or {}, "compression"))
    out.append("<h2>Configuration</h2>" + _kv_table(report.get("config") or {}, "config"))
    if report.get("no_reference"):
        out.append(_quant_only_section(prompts, ids))
        out.append("</body></html>\n")
        return write_bytes_atomic(path, "\n".join(out).encode("utf-8"))
    if lp and not lp.get("available", False):
        out.append(f"<p class='warn' id='lpips-status'>LPIPS not computed: "
                   f"{html.escape(str(lp.get('reason')))}</p>")
    elif lp.get("plumbing"):
        out.append("<p class='warn' id='lpips-status'>LPIPS computed with PLUMBING (random "
                   "backbone) weights: the LPIPS numbers are not perceptual-quality numbers.</p>")
    out.append(_suite_table(suite, prompts, ids))
    out.append(_plots(prompts, ids, suite, bps_list, has_lpips, has_agreement, imgs))
    out.append(_stills(prompts, ids, suite, bps_list, imgs, html_dir))
    out.append(_prompt_table(prompts, ids, has_agreement, html_dir))
    out.append("</body></html>\n")
    return write_bytes_atomic(path, "\n".join(out).encode("utf-8"))
