"""``hq-diffusion inspect MODEL``: per-layer distribution diagnostics of a model's weights.

MODEL is a registry name (``tiny-ltx``, ``ltx``, … — the tiny offline transformer of that family), a
directory (every ``*.safetensors`` under it, e.g. a diffusers model or pipeline directory) or one
``.safetensors`` file. For every 2-D weight (a linear layer) it reports, before and after the randomized
Hadamard transform the codec applies (rows padded and rotated per tile, each row divided by its RMS as the
codec does): excess kurtosis, skewness and the Kolmogorov–Smirnov statistic of the standardized entries
against N(0, 1); the tile-to-tile spread after the RHT (coefficient of variation of the per-tile RMS);
and the stored bits and SNR of the codec at the chosen rate with the chosen coder (``--coder``: ``auto``, the
default of ``quantize``, picks rANS where it beats Rice at that rate; the table names the coder each layer got). A table goes to stdout, an HTML page with
histograms (matplotlib PNGs embedded) to ``--html``.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from hq_diffusion.codec import CodecConfig, decode, encode, rotated_rows

from ._common import table
from .baselines import snr_db

#: entries drawn (seeded) for the KS statistic and the histograms of a large layer
SAMPLE = 1 << 16


def moments(x: torch.Tensor) -> tuple[float, float]:
    """(excess kurtosis, skewness) of all entries of ``x`` (any shape, float). Both 0 for a Gaussian."""
    v = x.double().flatten()
    v = v - v.mean()
    m2 = float((v * v).mean())
    if m2 == 0:
        raise ValueError("moments: constant tensor (zero variance)")
    return float((v**4).mean()) / m2**2 - 3.0, float((v**3).mean()) / m2**1.5


def ks_normal(x: torch.Tensor) -> float:
    """Kolmogorov–Smirnov statistic sup |F_n − Φ| of the entries of ``x`` standardized to mean 0, std 1."""
    v = x.double().flatten()
    v = torch.sort((v - v.mean()) / v.std()).values
    n = v.numel()
    phi = 0.5 * (1 + torch.erf(v / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - phi, phi - (i - 1) / n).max())


def _sample(x: torch.Tensor, k: int = SAMPLE) -> torch.Tensor:
    v = x.flatten()
    if v.numel() <= k:
        return v
    return v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:k]]


def layer_stats(name: str, w: torch.Tensor, bps: float, tile: int = 256, seed: int = 0, coder: str = "auto") -> dict:
    """Diagnostics of one weight ``w`` float (N, K) coded with ``coder`` (``"auto"``, ``"rice"`` or ``"rans"``).
    See the module docstring for each figure."""
    w = w.float()
    u, h = rotated_rows(w, tile, seed, name)
    rms = u.square().mean(1, keepdim=True).sqrt().clamp_min(1e-30)
    u = u / rms
    tiles = u.reshape(u.shape[0], -1, h).square().mean(-1).sqrt().flatten()
    kb, sb = moments(w)
    ka, sa = moments(u)
    q = encode(w, CodecConfig(bps=bps, coder=coder), key=name)
    return {
        "name": name, "shape": tuple(w.shape), "kurt_before": kb, "skew_before": sb, "ks_before": ks_normal(_sample(w)),
        "kurt_after": ka, "skew_after": sa, "ks_after": ks_normal(_sample(u)),
        "tile_spread": float(tiles.std() / tiles.mean()) if tiles.numel() > 1 else 0.0,
        "bits": q.total_bits, "bps": q.bps, "coder": q.coder, "snr": snr_db(w, decode(q)),
        "_before": _sample(w), "_after": _sample(u),
    }


def load_weights(model: str) -> dict[str, torch.Tensor]:
    """{name: float 2-D tensor} of MODEL (see the module docstring). Raises FileNotFoundError / ValueError
    naming MODEL when it is none of the accepted kinds or holds no 2-D weight."""
    p = Path(model)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"inspect: {model}: not a .safetensors file")
        files = [p]
    elif p.is_dir():
        files = sorted(p.rglob("*.safetensors"))
    else:
        from hq_diffusion.models import PIPELINE_NAMES, tiny_transformer

        key = model.removeprefix("tiny-")
        if key not in PIPELINE_NAMES:
            raise FileNotFoundError(f"inspect: {model!r} is no file, directory or registry name ({', '.join(PIPELINE_NAMES)})")
        return {f"{n}.weight": m.weight.detach().float() for n, m in tiny_transformer(key).named_modules()
                if isinstance(m, torch.nn.Linear)}
    from safetensors.torch import load_file

    out = {}
    for f in files:
        for k, t in load_file(str(f)).items():
            if t.dim() == 2 and t.is_floating_point() and min(t.shape) > 1:
                out[f"{f.relative_to(p) if p.is_dir() else f.name}:{k}" if len(files) > 1 else k] = t.float()
    if not out:
        raise ValueError(f"inspect: {model}: no 2-D floating-point weight found")
    return out


def _png(stats: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
    xs = torch.linspace(-5, 5, 201)
    for ax, key, title in ((axes[0], "_before", "before RHT"), (axes[1], "_after", "after RHT")):
        v = stats[key].double()
        v = ((v - v.mean()) / v.std()).clamp(-5, 5)
        ax.hist(v.numpy(), bins=100, density=True, log=True, color="#4a7")
        ax.plot(xs.numpy(), (torch.exp(-xs.square() / 2) / math.sqrt(2 * math.pi)).numpy(), "k--", lw=1)
        ax.set_title(f"{title}: kurt {stats['kurt' + key]:.2f}, KS {stats['ks' + key]:.3f}", fontsize=9)
        ax.set_ylim(1e-5, 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


COLS = ["layer", "shape", "kurt", "skew", "KS", "kurt RHT", "skew RHT", "KS RHT", "tile spread", "coder", "bits", "bps",
        "SNR dB"]


def _row(s: dict) -> list:
    return [s["name"], "×".join(map(str, s["shape"])), s["kurt_before"], s["skew_before"], f"{s['ks_before']:.4f}",
            s["kurt_after"], s["skew_after"], f"{s['ks_after']:.4f}", f"{s['tile_spread']:.3f}", s["coder"], s["bits"],
            f"{s['bps']:.3f}", s["snr"]]


def write_html(path: str, model: str, bps: float, stats: list[dict]) -> None:
    from hq_diffusion.eval.report import write_bytes_atomic

    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLS)
    body = []
    for s in stats:
        cells = "".join(f"<td>{html.escape(f'{v:.3f}' if isinstance(v, float) else str(v))}</td>" for v in _row(s))
        body.append(f"<tr>{cells}</tr><tr><td colspan='{len(COLS)}'><img alt='histograms of {html.escape(s['name'])}' "
                    f"src='data:image/png;base64,{_png(s)}'></td></tr>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>inspect {html.escape(model)}</title></head>"
            f"<body><h1>Weight distributions of {html.escape(model)} at {bps:g} bps</h1>"
            f"<table border='1' cellspacing='0'><tr>{head}</tr>{''.join(body)}</table></body></html>")
    write_bytes_atomic(path, page.encode("utf-8"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion inspect", description=__doc__.splitlines()[0])
    p.add_argument("model", help="registry name (tiny-ltx), diffusers directory, or .safetensors file")
    p.add_argument("--bps", type=float, default=4.0)
    p.add_argument("--coder", default="auto", choices=["auto", "rice", "rans"],
                   help="entropy coder: auto (rANS where it beats Rice at --bps, as quantize does), rice or rans")
    p.add_argument("--html", help="write the HTML page with plots here")
    p.add_argument("--max-layers", type=int, default=0, help="only the first N layers (0: all)")
    a = p.parse_args(argv)
    ws = load_weights(a.model)
    names = list(ws)[: a.max_layers or None]
    stats = [layer_stats(n, ws[n], a.bps, coder=a.coder) for n in tqdm(names, desc="layers", leave=False)]
    print(table(COLS, [_row(s) for s in stats]))
    if a.html:
        write_html(a.html, a.model, a.bps, stats)
        print(f"wrote {os.fspath(a.html)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
