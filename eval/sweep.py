"""Rate–quality sweep over quantization schemes: ``hq-diffusion eval --schemes e8,d4,a2,z,rtn4 --bps 2,3,4,5``.

Each scheme is one ordinary evaluation run (:func:`hq_diffusion.eval.runner.run_eval`) in its own directory
``OUT/<scheme>/`` (same prompts, seeds, generation settings; resumable like any run): the lattice schemes
quantize with ``hq_diffusion.quantize(lattice=...)`` at every ``--bps``, the RTN peer
(:mod:`hq_diffusion.eval.peers`) runs once, at its own rate (4 + 32/128 = 4.25 bits per weight for int4 g128).
The unquantized references are generated once, by the first scheme, and linked into the others' caches.

Then ``OUT`` receives:

- ``sweep.json`` / ``sweep.csv``: one point per (scheme, rate): the measured bits per weight (every stored bit,
  from the scheme's summary), compression, suite means of PSNR / SSIM / LPIPS / flicker PSNR, and content
  agreement when the runner records a per-prompt ``agreement``;
- ``rate_quality.png``: quality against measured bits per weight, one line per scheme (PSNR in dB,
  and agreement when present) — the figure to put in a README;
- ``report.html``: the page with that figure, the table and links to every scheme's own report.
"""

from __future__ import annotations

import dataclasses
import html
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

from . import page as _pg
from . import plots as P
from . import report as R
from .config import EvalConfig, _check_quantize_options
from .files import EvalInputError
from .merge import merge
from .peers import rtn_bps, rtn_quantize, rtn_summary

__all__ = ["SCHEMES", "parse_schemes", "scheme_configs", "run_sweep", "merge_sweep", "sweep_points",
           "rate_quality_figure", "write_sweep"]

#: ``--schemes`` names -> (label, kind): kind "lattice" (hq_diffusion.quantize, that lattice) or "rtn"
SCHEMES: dict[str, tuple[str, str]] = {
    "e8": ("hq-diffusion E8 + Rice", "lattice"),
    "d4": ("hq-diffusion D4 + Rice", "lattice"),
    "a2": ("hq-diffusion A2 + Rice", "lattice"),
    "z": ("hq-diffusion Z + Rice", "lattice"),
    "rtn4": ("RTN int4 g128 (fp16 scale + min)", "rtn"),
}
_RTN = {"rtn4": {"bits": 4, "group": 128}}
#: the sweep's metrics, in plot order
_METRICS = ("psnr", "ssim", "lpips", "flicker_psnr", "agreement")


def parse_schemes(text: str) -> tuple[str, ...]:
    """``"e8,d4,rtn4"`` -> ``("e8", "d4", "rtn4")``.  Raises EvalInputError naming an unknown or repeated
    scheme."""
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not items:
        raise EvalInputError("--schemes: empty list")
    bad = [t for t in items if t not in SCHEMES]
    if bad:
        raise EvalInputError(f"--schemes: unknown scheme {bad[0]!r}; known: {', '.join(SCHEMES)}")
    if len(set(items)) != len(items):
        raise EvalInputError(f"--schemes has duplicates: {text}")
    return tuple(items)


def scheme_configs(cfg: EvalConfig, schemes: tuple[str, ...]) -> list[tuple[str, EvalConfig, dict]]:
    """One ``(scheme, EvalConfig, run_eval hooks)`` per scheme, in ``cfg.out/<scheme>``.  Lattice schemes
    keep ``cfg``'s bit rates and options with their lattice; the RTN peer runs at its own rate.  Raises
    EvalInputError for options a scheme cannot take (e.g. ``--kv-bps`` with the weight-only RTN peer)."""
    out = []
    for s in schemes:
        sub = os.path.join(cfg.out, s)
        if SCHEMES[s][1] == "lattice":
            q = {**cfg.quantize, "lattice": s}
            _check_quantize_options(list(cfg.bps_list), q)
            out.append((s, dataclasses.replace(cfg, out=sub, quantize=q), {}))
            continue
        if cfg.quantize.get("kv_bps") is not None:
            raise EvalInputError(f"--schemes {s}: the RTN peer quantizes weights only; drop --kv-bps or {s}")
        opts = dict(_RTN[s])
        if cfg.quantize.get("skip") is not None:
            opts["skip"] = cfg.quantize["skip"]
        rate = rtn_bps(opts["bits"], opts["group"])
        out.append((s, dataclasses.replace(cfg, out=sub, quantize=opts, bps_list=(rate,)),
                    {"quantize_fn": rtn_quantize, "summary_fn": rtn_summary}))
    return out


def _share_references(src: str, dst: str) -> None:
    """Link (or copy) the cached references of run ``src`` into run ``dst`` where ``dst`` lacks them; the
    cache checks each file's fingerprint on use, so a reference of other settings is never used."""
    sdir, ddir = os.path.join(src, "ref"), os.path.join(dst, "ref")
    if not os.path.isdir(sdir):
        return
    os.makedirs(ddir, exist_ok=True)
    for name in sorted(os.listdir(sdir)):
        target = os.path.join(ddir, name)
        if not name.endswith(".npz") or os.path.exists(target):
            continue
        fd, tmp = tempfile.mkstemp(dir=ddir, prefix="." + name + ".", suffix=".tmp")
        os.close(fd)
        try:
            os.remove(tmp)
            try:
                os.link(os.path.join(sdir, name), tmp)
            except OSError:  # another file system, or no hard links: a copy holds the same bytes
                shutil.copyfile(os.path.join(sdir, name), tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def run_sweep(cfg: EvalConfig, schemes: tuple[str, ...], *, run: Callable | None = None,
              progress: bool = True, **run_kwargs: Any) -> dict | None:
    """Run (or resume) every scheme of the sweep, then write the sweep files (:func:`write_sweep`).

    Args:
        cfg: the validated run (its ``out`` is the sweep's directory; ``quantize["lattice"]`` is replaced).
        schemes: names of :data:`SCHEMES`.
        run: the run function (default :func:`hq_diffusion.eval.runner.run_eval`; tests pass a wrapper).
        run_kwargs: passed to every run (e.g. ``generate_fn``, ``barrier``, ``max_items``).
    Returns:
        the sweep dict, or None when a run did not merge (another rank's, or ``max_items`` stopped it).
    """
    if run is None:
        from .runner import run_eval as run
    reports = {}
    subs = scheme_configs(cfg, schemes)
    for n, (s, sub, hooks) in enumerate(subs):
        os.makedirs(sub.out, exist_ok=True)
        if n:
            _share_references(subs[0][1].out, sub.out)
        reports[s] = run(sub, progress=progress, **{**run_kwargs, **hooks})
    if any(rep is None for rep in reports.values()):  # every scheme ran its share; this process does not merge
        return None
    return write_sweep(cfg.out, reports)


def merge_sweep(out: str, schemes: tuple[str, ...]) -> dict:
    """``--merge-only`` of a sweep: merge every scheme's directory, then write the sweep files."""
    return write_sweep(out, {s: merge(os.path.join(out, s)) for s in schemes})


def sweep_points(reports: dict[str, dict]) -> list[dict]:
    """One row per (scheme, rate) from each scheme's merged report: ``{"scheme", "label", "bps" (requested),
    "bits_per_weight" (measured, every stored bit), "ratio", "n_prompts", "missing", <metric>: suite mean}``."""
    rows = []
    for s, rep in reports.items():
        for b in rep["bps_list"]:
            k = R.bps_key(b)
            suite = (rep.get("suite") or {}).get(k) or {}
            q = (rep.get("quantization") or {}).get(k) or {}
            ents = [e for e in rep["prompts"] if R.bps_key(e.get("bps")) == k]
            agree = [a for e in ents if (a := _pg.agreement(e)) is not None]
            row = {"scheme": s, "label": SCHEMES.get(s, (s,))[0], "bps": float(b),
                   "bits_per_weight": q.get("weighted_bps"), "ratio": q.get("ratio"), "n_prompts": len(ents),
                   "missing": sum(R.bps_key(m.get("bps")) == k for m in rep.get("missing") or [])}
            for m in _METRICS[:-1]:
                row[m] = (suite.get(m) or {}).get("mean")
            row["psnr_min"] = (suite.get("psnr") or {}).get("min")
            row["agreement"] = float(np.mean(agree)) if agree else None
            ref = ((rep.get("content") or {}).get(k) or {}).get("ref")
            row["ref_agreement"] = float(ref) if ref is not None else None
            rows.append(row)
    return rows


def rate_quality_figure(rows: list[dict], title: str | None = None):
    """The sweep's figure: PSNR (and agreement when recorded) against measured bits per weight, one line per
    scheme; ``title`` names the model under the panels."""
    metrics = ["psnr"] + (["agreement"] if any(r.get("agreement") is not None for r in rows) else [])
    lines: dict[str, list] = {}
    for r in rows:
        x = r["bits_per_weight"] if r.get("bits_per_weight") is not None else r["bps"]
        lines.setdefault(r["label"], []).append((x, {m: r.get(m) for m in metrics}))
    refs = [r["ref_agreement"] for r in rows if r.get("ref_agreement") is not None]
    # every scheme shares the unquantized reference: its agreement is one horizontal line
    ref_lines = {"agreement": float(np.mean(refs))} if refs and "agreement" in metrics else {}
    return P.rate_quality(lines, metrics, title=title, references=ref_lines)


def write_sweep(out: str, reports: dict[str, dict]) -> dict:
    """Write ``sweep.json``, ``sweep.csv``, ``rate_quality.png`` and ``report.html`` in ``out`` (atomic) from the
    schemes' merged reports; return the sweep dict ``{"model", "config", "schemes", "points", "missing"}``."""
    out = os.path.abspath(out)
    rows = sweep_points(reports)
    first = next(iter(reports.values()))
    cfg = {k: v for k, v in (first.get("config") or {}).items() if k not in ("bps", "lattice")}
    sweep = {"model": first.get("model"), "config": cfg, "schemes": list(reports), "points": rows,
             "missing": sum(len(r.get("missing") or []) for r in reports.values()),
             "lpips": first.get("lpips")}
    R.write_json_atomic(os.path.join(out, "sweep.json"), sweep)
    R.write_csv_atomic(os.path.join(out, "sweep.csv"), rows)
    info = _pg.model_info(sweep["model"], cfg)
    png = P.png_bytes(rate_quality_figure(rows, f"{info['model']} ({info['label']}), {cfg.get('num_prompts')} "
                                                f"prompts, vs its unquantized {cfg.get('dtype')} output"))
    R.write_bytes_atomic(os.path.join(out, "rate_quality.png"), png)
    R.write_bytes_atomic(os.path.join(out, "report.html"), _page(sweep, reports).encode("utf-8"))
    return sweep


def _page(sweep: dict, reports: dict[str, dict]) -> str:
    rows = sweep["points"]
    title = f"hq-diffusion rate\u2013quality sweep: {sweep['model']}"
    has_agreement = any(r.get("agreement") is not None for r in rows)
    o = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{_pg.CSS}</style></head><body><h1>{html.escape(title)}</h1>",
         _pg.model_banner(_pg.model_info(sweep["model"], sweep["config"]))]
    if sweep["missing"]:
        o.append(f"<p class='warn' id='sweep-missing'>Partial: {sweep['missing']} results are missing; "
                 f"rerun the command to finish.</p>")
    o.append("<h2>Rate\u2013quality</h2><p class='note'>Suite mean against the measured bits per weight (every "
             "stored bit: payload, side information, scales, headers), one line per scheme; the RTN int4 g128 "
             "peer runs at its own rate.  Value axes are zoomed to the data.  The same figure is "
             "<a href='rate_quality.png'>rate_quality.png</a>.</p>")
    o.append("<img class='plot' id='plot-sweep' alt='Rate-quality: mean PSNR"
             + (" and content agreement" if has_agreement else "")
             + " versus measured bits per weight, one line per scheme' src='rate_quality.png'>")
    cols = [("scheme", "label", None), ("requested bps", "bps", 3), ("bits/weight", "bits_per_weight", 3),
            ("ratio \u00d7", "ratio", 2), ("PSNR dB", "psnr", 2), ("min PSNR dB", "psnr_min", 2),
            ("SSIM", "ssim", 4), ("LPIPS", "lpips", 4), ("flicker PSNR dB", "flicker_psnr", 2)]
    if has_agreement:
        cols.append(("agreement", "agreement", 3))
    o.append("<table class='suite' id='sweep-table'><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c, _, _ in cols)
             + "<th>report</th></tr>")
    for r in rows:
        cells = "".join(f"<td>{html.escape(str(r[k]))}</td>" if d is None else f"<td class='num'>{_pg.fmt(r[k], d)}</td>"
                        for _, k, d in cols)
        link = _pg.rel_link(f"{r['scheme']}/report.html")
        o.append(f"<tr>{cells}<td><a href='{link}'>{html.escape(r['scheme'])}/report.html</a></td></tr>")
    o.append("</table>")
    o.append(_pg.explanations(has_agreement))
    o.append("<h2>Configuration</h2><table class='config'>"
             + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in sweep["config"].items()) + "</table>")
    o.append("</body></html>\n")
    return "\n".join(o)
