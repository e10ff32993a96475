"""``hq-diffusion bench tails``: heavy-tailed weights (Student-t ν=4, 1% of columns ×10).

Reports the excess kurtosis before and after the RHT and the SNR at 4 bps next to an iid Gaussian matrix
of the same shape encoded with the same configuration.
"""
from __future__ import annotations

import argparse

import torch

from hq_diffusion.codec import CodecConfig, decode, encode, excess_kurtosis, rotated_rows

from .baselines import snr_db
from ._common import emit, header, student_t_columns, table


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Student-t (ν = 4) as z / sqrt(χ²₄ / 4), with 1% of the columns scaled ×10. float32 (rows, cols)."""
    return student_t_columns(rows, cols, 4, 10, torch.Generator().manual_seed(seed))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench tails", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--bps", type=float, default=4.0)
    p.add_argument("--out")
    a = p.parse_args(argv)
    w = heavy_tailed(a.rows, a.cols)
    g = torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(1))
    rows = []
    for lat in ("e8", "d4", "a2", "z"):
        cfg = CodecConfig(bps=a.bps, lattice=lat)
        qt, qg = encode(w, cfg), encode(g, cfg)
        st, sg = snr_db(w, decode(qt)), snr_db(g, decode(qg))
        rows.append([lat.upper(), f"{qt.bps:.3f}", st, sg, f"{st - sg:+.2f}"])
    u, _ = rotated_rows(w, 256, 0, 0)
    text = header(f"Heavy tails, Student-t ν=4 with 1% of columns ×10, {a.rows}×{a.cols}", f"hq-diffusion bench tails --rows {a.rows} --cols {a.cols}")
    text += f"\nExcess kurtosis: {excess_kurtosis(w):.1f} before the RHT, {excess_kurtosis(u):.2f} after (tile 256).\n\n"
    text += table(["lattice", "total bps", "heavy-tailed SNR dB", "Gaussian SNR dB", "difference dB"], rows)
    emit(text, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
