"""The summary table ``hq-diffusion eval`` prints when it finishes: one heading line (model, its weights,
prompts, generation size) and one row per bit rate (per scheme and rate for a sweep) with the measured bits
per weight, compression and the suite means, then where the report is."""

from __future__ import annotations

from typing import Any

from . import page as _pg
from . import report as R

__all__ = ["format_run_table", "format_sweep_table"]

_COLS = (("bits/weight", ".3f", ""), ("ratio", ".2f", "x"), ("PSNR dB", ".2f", ""), ("min PSNR", ".2f", ""),
         ("SSIM", ".4f", ""), ("LPIPS", ".4f", ""), ("flicker dB", ".2f", ""), ("agreement", ".3f", ""))


def _cell(v: Any, spec: str, unit: str) -> str:
    if v is None:
        return "n/a"
    f = float(v)
    return "inf" if f == float("inf") else f"{format(f, spec)}{unit}"


def _heading(report: dict) -> str:
    cfg = report.get("config") or {}
    info = _pg.model_info(report.get("model", ""), cfg)
    gen = cfg.get("generation") or {}
    weights = {True: "trained weights", False: "random weights", None: "weights from the directory"}
    return (f"hq-diffusion eval: {info['model']} ({weights[info['trained']]}), {cfg.get('num_prompts')} prompt(s) x "
            f"{len(cfg.get('seeds') or [])} seed(s), {gen.get('num_frames', 1)} frames "
            f"{gen.get('height')}x{gen.get('width')}, {gen.get('num_inference_steps')} steps; "
            f"reference: {cfg.get('reference')}")


def _render(head: str, names: list[str], rows: list[list[str]], tail: list[tuple[str, str]]) -> str:
    widths = [max(len(n), *(len(r[i]) for r in rows)) if rows else len(n) for i, n in enumerate(names)]
    line = lambda cells: "  " + "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [head, line(names)] + [line(r) for r in rows]
    tw = max((len(a) for a, _ in tail), default=0)
    out += [f"  {a.ljust(tw)}  {b}".rstrip() for a, b in tail]
    return "\n".join(out)


def _values(suite: dict, q: dict, agreement: float | None) -> list:
    mean = lambda m: (suite.get(m) or {}).get("mean")  # noqa: E731
    return [q.get("weighted_bps"), q.get("ratio"), mean("psnr"), (suite.get("psnr") or {}).get("min"),
            mean("ssim"), mean("lpips"), mean("flicker_psnr"), agreement]


def _tail(report_path: str, seconds: float | None, missing: int, lpips: dict | None,
          no_reference: bool = False) -> list[tuple[str, str]]:
    tail = []
    lp = lpips or {}
    if no_reference:
        tail.append(("NOTE", R.NO_REFERENCE))
    elif not lp.get("available"):
        tail.append(("LPIPS", f"not computed: {lp.get('reason')}"))
    elif lp.get("plumbing"):
        tail.append(("LPIPS", "from PLUMBING weights: not a perceptual number"))
    if missing:
        tail.append(("MISSING", f"{missing} results (rerun the command to finish)"))
    tail.append(("report", report_path))
    if seconds is not None:
        tail.append(("time", f"{seconds:.1f} s"))
    return tail


def format_run_table(report: dict, report_path: str, seconds: float | None = None) -> str:
    """The table of one run (the runner's merged report dict): a row per bit rate with the worst prompt."""
    ids = _pg.prompt_ids(report["prompts"])
    rows = []
    for k, suite in (report.get("suite") or {}).items():
        q = (report.get("quantization") or {}).get(k) or {}
        agree = [a for e in report["prompts"] if R.bps_key(e.get("bps")) == k
                 and (a := _pg.agreement(e)) is not None]
        vals = _values(suite, q, sum(agree) / len(agree) if agree else None)
        w = suite.get("worst_prompt")
        worst = f"{ids[w['index']]} \"{_pg.short(w.get('prompt'), 40)}\"" if w else "n/a"
        rows.append([k] + [_cell(v, s, u) for v, (_, s, u) in zip(vals, _COLS)] + [worst])
    names = ["bps"] + [c for c, _, _ in _COLS] + ["worst prompt"]
    return _render(_heading(report), names, rows,
                   _tail(report_path, seconds, len(report.get("missing") or []), report.get("lpips"),
                         bool(report.get("no_reference"))))


def format_sweep_table(sweep: dict, reports: dict[str, dict], report_path: str,
                       seconds: float | None = None) -> str:
    """The table of a scheme sweep (:func:`hq_diffusion.eval.sweep.write_sweep`'s dict and the schemes'
    reports): a row per (scheme, rate)."""
    first = next(iter(reports.values()))
    rows = []
    for p in sweep["points"]:
        vals = [p.get("bits_per_weight"), p.get("ratio"), p.get("psnr"), p.get("psnr_min"), p.get("ssim"),
                p.get("lpips"), p.get("flicker_psnr"), p.get("agreement")]
        rows.append([p["scheme"], R.bps_key(p["bps"])] + [_cell(v, s, u) for v, (_, s, u) in zip(vals, _COLS)])
    names = ["scheme", "bps"] + [c for c, _, _ in _COLS]
    return _render(_heading(first), names, rows,
                   _tail(report_path, seconds, int(sweep.get("missing") or 0), first.get("lpips")))
