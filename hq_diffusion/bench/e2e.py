"""``hq-diffusion bench e2e``: the tiny LTX pipeline quantized by hq-diffusion and by a widely used 4-bit
scheme, side by side in one run.

Same pipeline weights, same prompts, same seeds. The peer is round-to-nearest int4 with one fp16 scale and
one fp16 minimum per group of 128 weights along the input axis (the group is the whole row when a layer
has fewer inputs), applied to exactly the layers hq-diffusion quantizes; its rate is its real stored rate
(4 + 32/group bits per weight). Quality is PSNR/SSIM of the uint8 output frames against the unquantized
pipeline. The random-weight tiny model only shows relative quality, not a real checkpoint's.

Three weight sets are measured. ``trained`` (the default, first): the trained tiny LTX pipeline
(``tiny-ltx-trained``) on its held-out captions, with its own generation settings; it also reports the content
check (object colour and direction vs the prompt). ``diffusers-init``: the tiny pipeline as built, whose linear weights are
*uniform* (PyTorch's default Kaiming-uniform init, excess kurtosis −1.2) — the best case of a min/max
uniform quantizer and the worst case of an RHT (which turns them Gaussian). ``trained-like``: each
transformer-block linear re-drawn, at the same standard deviation, from a Student-t (ν = 5) with 1% of its
input channels scaled ×4 — the bell-shaped, outlier-channel statistics of trained DiT weights.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from hq_diffusion.eval.metrics import psnr_per_frame, ssim_per_frame
from hq_diffusion.eval.content import check_pair
from hq_diffusion.eval.files import default_prompts_file, read_prompts, shapes_prompts_file, to_uint8

from ._common import emit, header, student_t_columns, table
from .baselines import rtn_groupwise


def rtn_quantize_layers(model: torch.nn.Module, names: list[str], bits: int = 4, group: int = 128) -> tuple[int, int]:
    """Replace the weight of each named ``nn.Linear`` by its RTN int-b reconstruction, in place.

    Returns (total stored bits, number of weights) of those layers at their real rate."""
    mods = dict(model.named_modules())
    bits_total = weights = 0
    for name in names:
        lin = mods[name]
        w = lin.weight.data
        g = group if w.shape[1] % group == 0 else w.shape[1]
        w_hat, b = rtn_groupwise(w.float(), bits, g)
        lin.weight.data = w_hat.to(w.dtype)
        bits_total += b
        weights += w.numel()
    return bits_total, weights


def trained_like_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every ``nn.Linear`` weight inside the transformer blocks, in place, at its current standard
    deviation: Student-t (ν = 5) entries, 1% of the input channels ×4."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "blocks." in name:
            t = student_t_columns(*m.weight.shape, 5, 4, g)
            m.weight.data = (t * (m.weight.float().std() / t.std())).to(m.weight.dtype)


def _build(init: str, dtype):
    from hq_diffusion.models import tiny_pipeline

    pipe = tiny_pipeline("tiny-ltx-trained" if init == "trained" else "ltx", seed=0, dtype=dtype)
    if init == "trained-like":
        trained_like_(pipe.transformer)
    return pipe


#: The weight sets of :func:`run`, the default first.
INITS: tuple[str, ...] = ("trained", "trained-like", "diffusers-init")


def _means(rows: dict[str, list[float]]) -> dict[str, float | None]:
    return {k: float(np.mean(v)) if v else None for k, v in rows.items()}


def run(num_prompts: int = 4, seed: int = 0, bps: float = 4.0, dtype=torch.bfloat16, progress: bool = True,
        init: str = "trained") -> dict:
    """Generate with the unquantized, the hq-diffusion and the RTN-int4 pipelines; return rates and metrics."""
    import hq_diffusion
    from hq_diffusion.models import generate, trained_call_kwargs

    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    call = trained_call_kwargs("tiny-ltx-trained") if init == "trained" else {}
    prompts = read_prompts(shapes_prompts_file() if init == "trained" else default_prompts_file())
    ref_pipe = _build(init, dtype)
    hq_pipe = hq_diffusion.quantize(_build(init, dtype), bps=bps, progress=False)
    s = hq_diffusion.summary(hq_pipe)
    names = [layer.name for layer in s.layers]  # "component.module" names
    peer_pipe = _build(init, dtype)
    peer_bits, peer_weights = rtn_quantize_layers(peer_pipe.transformer,
                                                  [n.removeprefix("transformer.") for n in names])
    peer_bps = peer_bits / peer_weights
    # hq-diffusion again, at the peer's own total rate (floored to 3 decimals: never above it)
    hq_eq = hq_diffusion.quantize(_build(init, dtype), bps=int(peer_bps * 1000) / 1000, progress=False)
    s_eq = hq_diffusion.summary(hq_eq)
    rows = {k: {"psnr": [], "ssim": [], "content": []} for k in ("hq", "hq_eq", "rtn")}
    ref_content = []
    for prompt in tqdm(prompts[:num_prompts], desc="prompts", disable=not progress, leave=False):
        ref = to_uint8(generate(ref_pipe, "ltx", prompt, seed, **call))
        for key, pipe in (("hq", hq_pipe), ("hq_eq", hq_eq), ("rtn", peer_pipe)):
            out = to_uint8(generate(pipe, "ltx", prompt, seed, **call))
            rows[key]["psnr"].append(float(np.mean(psnr_per_frame(ref, out))))
            rows[key]["ssim"].append(float(np.mean(ssim_per_frame(ref, out))))
            c = check_pair(ref, out, prompt)
            if c is not None:
                rows[key]["content"].append(c["quant"]["agreement"])
                if key == "hq":
                    ref_content.append(c["ref"]["agreement"])
    return {
        "layers": len(names),
        "hq": {"bps": s.weighted_bps, "ratio": s.ratio, **_means(rows["hq"])},
        "hq_eq": {"bps": s_eq.weighted_bps, **_means(rows["hq_eq"])},
        "rtn": {"bps": peer_bps, **_means(rows["rtn"])},
        "ref_content": float(np.mean(ref_content)) if ref_content else None,
        "prompts": num_prompts,
        "init": init,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench e2e", description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bps", type=float, default=4.0)
    p.add_argument("--out")
    a = p.parse_args(argv)
    rows = []
    for init in INITS:
        r = run(a.num_prompts, a.seed, a.bps, init=init)
        for key, label in (("hq", "hq-diffusion E8 + Rice"), ("hq_eq", "hq-diffusion E8 + Rice, at the peer's rate"),
                           ("rtn", "RTN int4, group 128 (fp16 scale + min)")):
            content = "n/a" if r[key]["content"] is None else \
                f"{100 * r[key]['content']:.0f}% (bf16 {100 * r['ref_content']:.0f}%)"
            rows.append([init, label, f"{r[key]['bps']:.3f}", r[key]["psnr"], f"{r[key]['ssim']:.4f}", content])
    text = header(f"Tiny LTX pipeline, {r['layers']} quantized linears, {r['prompts']} prompts, bf16",
                  f"hq-diffusion bench e2e --num-prompts {a.num_prompts} --bps {a.bps:g}")
    text += "\n" + table(["weights", "scheme", "weight bits/weight (total)", "mean PSNR dB vs bf16", "mean SSIM",
                          "content agreement"], rows)
    emit(text, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
