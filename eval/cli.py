"""``hq-diffusion eval``: the argument parser and the entry point (see :mod:`hq_diffusion.eval.runner`)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .config import DTYPES, MODEL_ALIASES, build_config
from .files import EvalInputError, quiet_library_logs
from .merge import merge
from .runner import run_eval
from .table import format_run_table, format_sweep_table

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as EvalInputError (one line, exit status 2 from ``main``)."""

    def error(self, message: str):
        raise EvalInputError(f"{message} (see {self.prog} --help)")


def build_parser(prog: str = "hq-diffusion eval") -> argparse.ArgumentParser:
    """The ``hq-diffusion eval`` argument parser (usage errors raise :class:`EvalInputError`)."""
    p = _Parser(
        prog=prog, description="Evaluate a quantized diffusers pipeline against the unquantized one over "
                               "a prompt suite (same prompts, same seeds); writes report.json/csv/html.")
    p.add_argument("--model", default="tiny-ltx-trained",
                   help=f"{' | '.join(MODEL_ALIASES)} | PATH to a diffusers pipeline directory, float or saved "
                        f"quantized by hq-diffusion (default: tiny-ltx-trained, the trained tiny LTX; the others "
                        f"have random weights)")
    p.add_argument("--reference", metavar="MODEL",
                   help="with a --model saved quantized: the float pipeline to compare with, a tiny model key or "
                        "a float pipeline directory, or none for a quant-only run (no PSNR/SSIM) (default: the origin the "
                        "saved directory records; without one, a quant-only run)")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line, '#' comments (default: the "
                                                     "16 held-out captions for tiny-ltx-trained, else the "
                                                     "packaged 32-prompt suite)")
    p.add_argument("--num-prompts", type=int, metavar="N", help="use the first N prompts")
    p.add_argument("--seeds", default="0", help="comma-separated generation seeds (default: 0)")
    p.add_argument("--bps", help="weight bits per weight, or a comma-separated sweep (3,4,5) (default: 4)")
    q = p.add_argument_group("quantization (hq_diffusion.quantize; a --model saved quantized fixes these)")
    q.add_argument("--lattice", help="e8 | d4 | a2 | z (default: e8)")
    q.add_argument("--schemes", metavar="LIST",
                   help="rate-quality sweep over schemes, comma-separated: e8, d4, a2, z (hq-diffusion with that "
                        "lattice, at every --bps) and rtn4 (RTN int4 g128 peer, at its own rate: 4.25 bits/weight, "
                        "more where a layer has fewer than 128 inputs); "
                        "one run per scheme in OUT/<scheme>, the sweep page, table and rate_quality.png in OUT "
                        "(replaces --lattice)")
    q.add_argument("--mma",
                   help="matmul path: auto | bf16 | int8 | fp8 | nvfp4 | mxfp4 (default: auto)")
    q.add_argument("--kv-bps", type=float, default=None, help="also quantize attention K/V at this rate (default: off)")
    q.add_argument("--kv-correction",
                   help="K/V bias correction: none | signs | haar, optionally +dither (default: haar+dither)")
    q.add_argument("--storage", help="weight storage: rice | int8 (default: rice)")
    q.add_argument("--skip", help="comma-separated module-name patterns kept unquantized (default: the "
                                   "architecture preset)")
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, help="inference steps")
    g.add_argument("--frames", type=int, help="video frames")
    g.add_argument("--height", type=int, help="frame height in pixels")
    g.add_argument("--width", type=int, help="frame width in pixels")
    g.add_argument("--dtype", choices=DTYPES,
                   help="dtype of the reference and of the pipeline before quantization (default: bfloat16; "
                        "for a --model saved quantized: the dtype it was saved in)")
    g.add_argument("--model-seed", type=int, default=0, help="random-init seed of the tiny pipelines")
    g.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--lpips-weights", metavar="PATH", help="full LPIPS state dict (default: the torchvision "
                                                           "backbone in the torch hub cache, if present)")
    p.add_argument("--out", default=os.path.join("runs", "eval"), help="output directory (default: runs/eval)")
    p.add_argument("--merge-only", action="store_true", help="only merge the items in --out into the report")
    p.add_argument("--no-barrier", action="store_true",
                   help="with several ranks: write items and exit without merging (merge with --merge-only)")
    p.add_argument("--max-items", type=int, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _error(msg: str) -> int:
    print(f"hq-diffusion eval: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None, **hooks: Any) -> int:
    """``hq-diffusion eval``.  ``hooks`` (``quantize_fn``, ``summary_fn``, ``generate_fn``) are for tests."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        schemes = None
        if args.schemes is not None:
            from .sweep import parse_schemes

            schemes = parse_schemes(args.schemes)
            if any(a == "--lattice" or a.startswith("--lattice=") for a in argv):
                raise EvalInputError("--lattice and --schemes exclude each other (name the lattices in --schemes)")
        if args.merge_only:
            if schemes:
                return _finish_sweep(args.out, schemes)
            rep = merge(args.out)
            return _finish(rep, args.out)
        cfg = build_config(args)
        quiet_library_logs()
        t0 = time.perf_counter()
        if schemes:
            from .sweep import run_sweep

            sweep = run_sweep(cfg, schemes, barrier=not args.no_barrier, max_items=args.max_items,
                              progress=not args.no_progress, **hooks)
            if sweep is None:
                return 0
            return _finish_sweep(cfg.out, schemes, time.perf_counter() - t0, sweep)
        rep = run_eval(cfg, barrier=not args.no_barrier, max_items=args.max_items,
                       progress=not args.no_progress, **hooks)
        if rep is None:
            return 0
        return _finish(rep, cfg.out, time.perf_counter() - t0)
    except EvalInputError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print("hq-diffusion eval: interrupted; finished items are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


def _shown_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _finish_sweep(out: str, schemes: tuple[str, ...], seconds: float | None = None,
                  sweep: dict | None = None) -> int:
    """Print the sweep table (``sweep`` None: merge ``out`` first; the schemes' reports are read back from
    ``out``); 1 when results are missing."""
    from .files import read_json
    from .sweep import merge_sweep

    if sweep is None:
        sweep = merge_sweep(out, schemes)
    reports = {s: read_json(os.path.join(os.path.abspath(out), s, "report.json")) for s in schemes}
    print(format_sweep_table(sweep, reports, _shown_path(os.path.join(os.path.abspath(out), "report.html")),
                             seconds))
    if sweep["missing"]:
        print(f"hq-diffusion eval: error: the sweep is partial: {sweep['missing']} results are missing (run the "
              f"remaining ranks or rerun the command)", file=sys.stderr)
        return 1
    return 0


def _finish(rep: dict, out: str, seconds: float | None = None) -> int:
    n = len(rep["prompts"])
    print(format_run_table(rep, _shown_path(os.path.join(os.path.abspath(out), "report.html")), seconds))
    if rep["missing"]:
        print(f"hq-diffusion eval: error: the report is partial: {len(rep['missing'])} of "
              f"{len(rep['missing']) + n} results are missing (run the remaining ranks or rerun the command)",
              file=sys.stderr)
        return 1
    return 0
