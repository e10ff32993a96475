"""``hq-diffusion quantize SRC --out DST``: the command line of :func:`~.convert.convert`.

Exit codes: 0 done, 2 refused input (one line on stderr naming the file and tensor; nothing partial is left),
130 interrupted (the finished layers are kept: the same command resumes).
"""
from __future__ import annotations

import argparse
import signal
import sys

from ..codec import HQFormatError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hq-diffusion quantize",
                                description="Quantize a float diffusers checkpoint one tensor at a time.")
    p.add_argument("src", help="a local diffusers pipeline directory or model directory (safetensors), or a "
                               "single-file safetensors checkpoint (with --model-class)")
    p.add_argument("--out", required=True, help="output directory (appears atomically when done)")
    p.add_argument("--bps", type=float, default=4.0, help="bits per weight, every stored bit counted (4.0)")
    p.add_argument("--lattice", default="e8", help="e8, d4, a2 or z (e8)")
    p.add_argument("--storage", default="rice", help="rice or int8 (rice)")
    p.add_argument("--coder", default="auto", choices=["auto", "rice", "rans"],
                   help="entropy coder of the bitstream: rice, rans, or auto = rans where it beats rice at the "
                        "rate (auto)")
    p.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32", "log8"],
                   help="row-scale format (float16; log8: an 8-bit log2 code per row on a per-tensor grid)")
    p.add_argument("--kv-bps", type=float, default=None, help="quantize attention K/V at this rate (off)")
    p.add_argument("--kv-correction", default=None, help="K/V bias correction (HQConfig default)")
    p.add_argument("--skip", action="append", default=None, help="skip pattern (repeatable; default: preset)")
    p.add_argument("--components", default="transformer", help="pipeline components to quantize, comma-separated")
    p.add_argument("--dtype", default="keep", choices=["keep", "bfloat16", "float16", "float32"],
                   help="dtype of the unquantized float tensors (keep: as stored)")
    p.add_argument("--device", default="cpu", help="encode on cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores on cpu)")
    p.add_argument("--max-shard-size", default="10GB", help="largest output shard (10GB)")
    p.add_argument("--model-class", default=None,
                   help="single-file SRC: its diffusers model class, e.g. LTX2VideoTransformer3DModel")
    p.add_argument("--config", default=None,
                   help="single-file SRC: a model directory or JSON file with its config (default: the class's)")
    p.add_argument("--on-invalid", default="raise", choices=["raise", "skip"], help="NaN/Inf weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .convert import DTYPES, convert

    overrides = {"bps": args.bps, "lattice": args.lattice, "storage": args.storage, "kv_bps": args.kv_bps,
                 "coder": args.coder, "scale_dtype": args.scale_dtype}
    if args.kv_correction is not None:
        overrides["kv_correction"] = args.kv_correction
    if args.skip is not None:
        overrides["skip"] = tuple(args.skip)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    stats: dict = {}
    try:
        out = convert(args.src, args.out, components=args.components, dtype=DTYPES.get(args.dtype),
                      device=args.device, workers=args.workers, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite, on_invalid=args.on_invalid, progress=not args.no_progress,
                      model_class=args.model_class, model_config=args.config, stats=stats, **overrides)
    except KeyboardInterrupt:
        print("hq-diffusion quantize: interrupted; run the same command again to resume from the finished layers",
              file=sys.stderr)
        return 130
    except (HQFormatError, ValueError, TypeError, OSError) as e:
        print(f"hq-diffusion quantize: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    if out is not None:
        print(f"hq-diffusion quantize: wrote {out}")
    if stats:
        w = stats["workers"]
        print(f"hq-diffusion quantize: encoded {stats['encoded_bytes'] / 1e6:.0f} MB of float weights in "
              f"{stats['encode_s']:.1f} s ({stats['encode_mb_s']:.1f} MB/s, {w} worker{'s' * (w != 1)})")
    return 0
