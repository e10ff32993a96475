"""``hq-diffusion demo`` (``make demo``): quantize the embedded tiny LTX-Video pipeline at 4 bits per weight
with 4-bit attention K/V, evaluate it against the unquantized pipeline on a short prompt suite, write the
report (``runs/demo`` by default) and print a summary table.

The default model is ``tiny-ltx-trained``: the tiny LTX pipeline trained on procedural clips of coloured
shapes moving over plain backgrounds (``hq-diffusion train-tiny``), run on held-out captions, so both
columns show a recognisable moving object and the table adds the content check (is the object of the
prompt's colour, does it move the prompt's way). ``--model tiny-ltx`` runs the random-weight pipeline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main", "format_table"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hq-diffusion demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="report directory (default: runs/demo)")
    p.add_argument("--model", default="tiny-ltx-trained",
                   help="tiny model key (default: tiny-ltx-trained; tiny-ltx has random weights)")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts of the packaged suite to run (default: 4)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--bps", default="4", help="weight bits per weight (default: 4)")
    p.add_argument("--kv-bps", default="4", help="K/V bits per scalar, or 'off' (default: 4)")
    p.add_argument("--lpips-weights", metavar="PATH", help="full LPIPS state dict (default: the torchvision "
                                                           "backbone in the torch hub cache, if present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fmt(v, spec: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{format(float(v), spec)}{unit}"


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def format_table(report: dict, report_path: str, seconds: float | None = None) -> str:
    """The demo's summary table, one block per bit rate of ``report`` (the runner's report dict)."""
    lines: list[str] = []
    cfg = report.get("config", {})
    lp = report.get("lpips") or {}
    gen = cfg.get("generation") or {}
    n_prompts = cfg.get("num_prompts")
    seeds = cfg.get("seeds") or []
    from hq_diffusion.integrations import families

    weights = "trained weights" if families.is_trained(str(report.get("model"))) else "random weights"
    lines.append(f"hq-diffusion demo: {report.get('model')} ({weights}), {n_prompts} prompt(s) x "
                 f"{len(seeds)} seed(s), {gen.get('num_frames', 1)} frames {gen.get('height')}x{gen.get('width')}, "
                 f"{gen.get('num_inference_steps')} steps; reference: {cfg.get('reference')}")
    rows: list[tuple[str, str]] = []
    for k, suite in (report.get("suite") or {}).items():
        q = (report.get("quantization") or {}).get(k) or {}
        rows.append((f"--- {k} bps", ""))
        rows.append(("compression", f"{_fmt(q.get('ratio'), '.2f', 'x')}  (quantized linears: "
                                    f"{_mib(q.get('bytes_bf16'))} bf16 -> {_mib(q.get('bytes_quantized'))})"))
        rows.append(("weight bits/weight", f"{_fmt(q.get('weighted_bps'), '.3f')}  (all stored bits counted; "
                                           f"{len(q.get('layers') or [])} layers quantized, "
                                           f"{len(q.get('skipped') or [])} kept)"))
        kv = _kv_info(q.get("kv"))
        rows.append(("K/V bits/scalar", kv))
        for metric, name, spec, unit in (("psnr", "mean PSNR", ".2f", " dB"), ("ssim", "mean SSIM", ".4f", ""),
                                         ("lpips", "mean LPIPS", ".4f", ""),
                                         ("flicker_psnr", "mean flicker PSNR", ".2f", " dB")):
            s = suite.get(metric)
            if metric == "lpips" and not lp.get("available"):
                rows.append((name, f"unavailable: {lp.get('reason')}"))
            elif s is None or s.get("mean") is None:
                inf = s is not None and s.get("n_inf")
                rows.append((name, "inf (identical frames)" if inf else "n/a"))
            else:
                extra = f"  (min {_fmt(s.get('min'), spec, unit)} over prompts)" if metric == "psnr" else ""
                rows.append((name, _fmt(s["mean"], spec, unit) + extra))
        c = (report.get("content") or {}).get(k)
        if c:
            rows.append(("content agreement", f"{100 * c['ref']:.0f}% unquantized, {100 * c['quant']:.0f}% quantized "
                                              f"(colour + direction vs the prompt, {c['n']} clip(s))"))
        if lp.get("available") and lp.get("plumbing"):
            rows.append(("", "LPIPS from PLUMBING weights: not a perceptual number"))
        w = suite.get("worst_prompt")
        if w:
            text = w.get("prompt") or ""
            text = text if len(text) <= 60 else text[:59] + "\u2026"
            psnr = _fmt(w.get("psnr"), ".2f", " dB")
            rows.append(("worst prompt", f"\"{text}\" (seed {w.get('seed')}, PSNR {psnr})"))
    if report.get("missing"):
        rows.append(("MISSING", f"{len(report['missing'])} results (rerun to finish)"))
    rows.append(("report", report_path))
    if seconds is not None:
        rows.append(("time", f"{seconds:.1f} s"))
    width = max(len(a) for a, _ in rows)
    lines += [f"  {a.ljust(width)}  {b}".rstrip() for a, b in rows]
    return "\n".join(lines)


def _kv_info(kv: dict | None) -> str:
    """K/V line from QuantSummary.to_dict()["kv"]: measured bits per K/V scalar (payload + side + norms)."""
    if not kv:
        return "off (K/V not quantized)"
    parts = []
    for comp, info in kv.items():
        s = (info or {}).get("summary") or {}
        bits = s.get("bits_per_scalar")
        if bits is None:
            parts.append(f"{comp}: no forward pass measured yet")
            continue
        b = s.get("breakdown") or {}
        parts.append(f"{bits:.3f} measured (payload {_fmt(b.get('payload'), '.3f')} + side "
                     f"{_fmt(b.get('side'), '.3f')} + norms {_fmt(b.get('norms'), '.3f')}), "
                     f"{_fmt(s.get('compression'), '.2f', 'x')} vs fp16")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """``hq-diffusion demo``.  Returns the exit status."""
    args = _parser().parse_args(argv)
    from hq_diffusion.eval.cli import build_parser
    from hq_diffusion.eval.config import build_config
    from hq_diffusion.eval.files import EvalInputError, quiet_library_logs
    from hq_diffusion.eval.runner import run_eval

    eval_argv = ["--model", args.model, "--num-prompts", str(args.num_prompts), "--seeds", args.seeds,
                 "--bps", args.bps, "--out", args.out]
    if args.kv_bps.lower() != "off":
        eval_argv += ["--kv-bps", args.kv_bps]
    if args.lpips_weights:
        eval_argv += ["--lpips-weights", args.lpips_weights]
    t0 = time.perf_counter()
    try:
        cfg = build_config(build_parser("hq-diffusion demo").parse_args(eval_argv))
        quiet_library_logs()
        report = run_eval(cfg, progress=not args.no_progress)
    except EvalInputError as e:
        print(f"hq-diffusion demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hq-diffusion demo: interrupted; rerun to resume", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    path = os.path.join(cfg.out, "report.html")
    rel = os.path.relpath(path)
    print(format_table(report, path if rel.startswith("..") else rel, seconds))
    return 1 if report.get("missing") else 0


if __name__ == "__main__":
    sys.exit(main())
