"""``hq-diffusion bench rans-linear``: Rice against rANS inside the compressed ``HQLinear`` on this CPU.

For an ``nn.Linear`` with iid N(0, 1) weights (seeded) quantized at each rate with ``coder`` ``rice``, ``rans``
and ``auto`` (what ``quantize`` does by default): the layer's stored rate (every stored bit of the codec's
bitstream, as ``hq_meta["bps"]``), its SNR (decoded weight against the original), the bytes its buffers hold,
and the median time of one CPU forward with ``--tokens`` bf16 tokens on ``--threads`` threads — decoding the
streams in the forward, and inside :func:`~hq_diffusion.nn.cpu_forward.cached_codes` after its first call
(decode once per step). ``--pipeline NAME``: wall time of one ``generate`` of the tiny offline pipeline
``NAME`` quantized with each coder (the cost of the default coder on a whole CPU generation).
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from ._common import emit, header, median_time, table

CODERS = ("rice", "rans", "auto")


def layer_rows(rows: int, cols: int, rates: list[float], tokens: int, repeat: int) -> list[list]:
    """One table row per (rate, coder): see the module docstring."""
    from torch import nn

    from hq_diffusion.codec import CodecConfig
    from hq_diffusion.nn.cpu_forward import cached_codes
    from hq_diffusion.nn.linear import HQLinear

    lin = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = []
    for bps, coder in tqdm([(b, c) for b in rates for c in CODERS], desc="layers", leave=False):
        m = HQLinear.from_linear(lin, CodecConfig(bps=bps, coder=coder), key="bench.layer", mma="bf16")
        t_fwd = median_time(lambda: m(x), repeat)
        with cached_codes(m):
            m(x)
            t_cached = median_time(lambda: m(x), repeat)
        out.append([f"{bps:g}", coder, m.storage, f"{m.hq_meta['bps']:.4f}", f"{m.hq_meta['snr_db']:.2f}",
                    f"{m.nbytes / 2**10:.0f}", f"{t_fwd * 1e3:.1f}", f"{t_cached * 1e3:.1f}"])
    return out


def pipeline_rows(name: str, bps: float) -> list[list]:
    """Wall time of one ``generate`` of the tiny pipeline ``name`` quantized with each coder."""
    from hq_diffusion.integrations.api import quantize
    from hq_diffusion.models import generate, tiny_pipeline

    out = []
    for coder in ("rice", "auto"):
        pipe = tiny_pipeline(name, 0)
        quantize(pipe, bps=bps, coder=coder, progress=False)
        generate(pipe, name, "a red cat", 0)  # warm-up
        t0 = time.perf_counter()
        generate(pipe, name, "a red cat", 0)
        out.append([name, coder, f"{time.perf_counter() - t0:.2f}"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench rans-linear", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--rates", default="3,4,5,8", help="comma-separated total bps")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pipeline", default=None, help="also time one generate of this tiny pipeline (e.g. ltx)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rates = [float(r) for r in a.rates.split(",")]
    cmd = (f"hq-diffusion bench rans-linear --rows {a.rows} --cols {a.cols} --rates {a.rates} --tokens {a.tokens} "
           f"--threads {a.threads} --repeat {a.repeat}" + (f" --pipeline {a.pipeline}" if a.pipeline else ""))
    text = header(f"HQLinear {a.rows}×{a.cols} (iid N(0,1)), Rice vs rANS, {a.tokens} bf16 tokens, "
                  f"{a.threads} thread(s), median of {a.repeat}", cmd) + "\n"
    text += table(["bps asked", "coder", "stored as", "total bps", "SNR dB", "buffers KiB", "forward ms",
                   "forward ms (cached_codes)"], layer_rows(a.rows, a.cols, rates, a.tokens, a.repeat))
    if a.pipeline:
        text += "\n\n" + table(["tiny pipeline", "coder", "generate s"], pipeline_rows(a.pipeline, 4.0))
    emit(text, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
