"""``hq-diffusion bench speed``: codec throughput on this machine (median of N runs).

Throughput is MB/s of bf16 input (2 bytes per weight); with several coders (``--coder rice,rans``) the
rounds are interleaved (each round times every coder once) and each figure is the median over rounds. Also the ratio of one decode to one ``F.linear``
of the same matrix with 512 tokens, the cost a weight-only path pays per forward on the CPU.

``--forward``: one quantized linear layer's CPU forward (default 4096×4096, 16 bf16 tokens, one thread) side by
side with its peers — diffusers' ``GGUFLinear`` with Q4_0 (gguf-py), bitsandbytes NF4 and optimum-quanto
qint4 when installed (a peer that cannot run is listed with the reason) — timed interleaved, median of N.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hq_diffusion.codec import CodecConfig, decode, encode

from ._common import emit, header, median_time, table
from .forward_peers import forward_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench speed", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--lattices", default="e8")
    p.add_argument("--bps", type=float, default=4.0)
    p.add_argument("--coder", default="rice",
                   help="entropy coder(s), comma-separated (rice, rans): several are timed side by side in one run")
    p.add_argument("--tokens", type=int, default=16, help="--forward: tokens per forward")
    p.add_argument("--threads", type=int, default=1, help="--forward: torch threads")
    p.add_argument("--forward", action="store_true", help="time one layer's CPU forward against its peers")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.forward:
        emit(forward_table(a.rows, a.cols, a.tokens, a.bps, a.repeat, a.threads), a.out)
        return 0
    w = torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mb = w.numel() * 2 / 1e6
    x = torch.randn(512, a.cols, dtype=torch.bfloat16)
    t_lin = median_time(lambda: F.linear(x, w), a.repeat)
    coders = a.coder.split(",")
    bad = [c for c in coders if c not in ("rice", "rans")]
    if bad:
        p.error(f"--coder: unknown coder(s) {bad}; choose from rice, rans")
    rows = []
    for lat in a.lattices.split(","):
        cfgs = [CodecConfig(bps=a.bps, lattice=lat, coder=coder) for coder in coders]
        qs = [encode(w, cfg) for cfg in cfgs]  # also the warm-up
        times = [[[], [], []] for _ in coders]
        for _ in tqdm(range(a.repeat), desc=f"bench speed {lat}", disable=len(coders) == 1):
            for cfg, q, tm in zip(cfgs, qs, times):  # interleaved: a load change hits every coder alike
                tm[0].append(median_time(lambda: encode(w, cfg), 1, warmup=0))
                tm[1].append(median_time(lambda: decode(q, out="codes"), 1, warmup=0))
                tm[2].append(median_time(lambda: decode(q), 1, warmup=0))
        for coder, q, tm in zip(coders, qs, times):
            t_enc, t_codes, t_w = (statistics.median(t) for t in tm)
            rows.append([lat.upper(), coder, f"{q.bps:.3f}", mb / t_enc, mb / t_codes, mb / t_w,
                         f"{t_codes / t_lin:.2f}×"])
    cmd = f"hq-diffusion bench speed --rows {a.rows} --cols {a.cols} --repeat {a.repeat} --lattices {a.lattices} --coder {a.coder}"
    text = header(f"Codec speed, {a.rows}×{a.cols} bf16, median of {a.repeat}", cmd)
    text += f"\nOne F.linear with 512 bf16 tokens: {t_lin * 1e3:.1f} ms.\n\n"
    text += table(["lattice", "coder", "total bps", "encode MB/s", "decode→codes MB/s", "decode→bf16 weight MB/s",
                   "decode→codes / F.linear(512 tok)"], rows)
    emit(text, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
