"""``hq-diffusion bench rd``: rate–distortion of the codec on iid N(0, 1) weights, against baselines.

Every rate is the *total* stored rate (payload, side information, scales, headers). Table 1 gives SNR per
lattice at 2, 3, 4, 5 bps with the Shannon bound (6.02·R dB), once per entropy coder (Rice and rANS, each
at its own total rate). Table 2 puts RTN int-b (group 128), NF4
(block 64, the real NF4 codebook) and a HIGGS-like 2-D Gaussian grid after the RHT (the converged grid asset)
at their real rates next to E8 encoded at exactly the same total rate, once per entropy coder.
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from hq_diffusion.codec import CodecConfig, decode, encode

from . import baselines
from ._common import emit, header, table

LATTICES = ("e8", "d4", "a2", "z")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench rd", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--rates", default="2,3,4,5", help="comma-separated total bps for table 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lattices", default=",".join(LATTICES), help="comma-separated lattices for table 1")
    p.add_argument("--coders", default="rice,rans", help="comma-separated entropy coders for table 1")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--out", help="also write the markdown here")
    a = p.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",")]
    w = torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(a.seed))
    cmd = (f"hq-diffusion bench rd --rows {a.rows} --cols {a.cols} --rates {a.rates} --lattices {a.lattices} "
           f"--coders {a.coders}" + (" --no-baselines" if a.no_baselines else ""))
    coders = a.coders.split(",")
    rows = []
    jobs = [(lat, r) for lat in a.lattices.split(",") for r in rates]
    for lat, r in tqdm(jobs, desc="lattice × rate", leave=False):
        row = [lat.upper(), f"{r:g}"]
        for coder in coders:
            q = encode(w, CodecConfig(bps=r, lattice=lat, coder=coder))
            row += [f"{q.bps:.4f}", baselines.snr_db(w, decode(q))]
        rows.append(row + [6.02 * r, 6.02 * r - row[-1]])
    text = [header(f"Rate–distortion, {a.rows}×{a.cols} iid N(0,1)", cmd)]
    cols = [c for coder in coders for c in (f"{coder} total bps", f"{coder} SNR dB")]
    text.append(table(["lattice", "target bps", *cols, "Shannon 6.02·R dB", f"gap dB ({coders[-1]})"], rows))
    if not a.no_baselines:
        brow = []
        peers = [(f"RTN int{b} g128", lambda b=b: baselines.rtn_groupwise(w, b)) for b in (3, 4, 5)]
        peers += [("NF4 block-64", lambda: baselines.normal_float(w, 4))]
        peers += [(f"HIGGS-like 2-D grid, {b} bit/dim", lambda b=b: baselines.higgs_like(w, b)) for b in (3, 4, 5)]
        for name, fn in tqdm(peers, desc="baselines", leave=False):
            w_hat, bits = fn()
            rate = bits / w.numel()
            peer = baselines.snr_db(w, w_hat)
            row = [name, f"{rate:.3f}", peer]
            for coder in coders:
                q = encode(w, CodecConfig(bps=rate, lattice="e8", coder=coder))
                e8 = baselines.snr_db(w, decode(q))
                row += [f"{q.bps:.3f}", e8, f"{e8 - peer:+.2f}"]
            brow.append(row)
        text.append("")
        bcols = [c for coder in coders for c in (f"E8 {coder} total bps", f"E8 {coder} SNR dB", f"{coder} gain dB")]
        text.append(table(["baseline", "its total bps", "its SNR dB", *bcols], brow))
    emit("\n".join(text), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
