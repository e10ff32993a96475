"""``hq-diffusion bench compile``: one denoising step of a tiny quantized pipeline, eager vs ``torch.compile``.

The tiny pipeline (``--model``, default ``ltx``) is quantized at ``--bps`` (and its attention K/V at
``--kv-bps``, when given); the transformer's inputs of one
denoising step are captured from a real pipeline call (a forward pre-hook), then the transformer is timed on
them eagerly and compiled (``torch.compile(fullgraph=True)``, inductor): the compile time of the first call,
and the median of ``--repeat`` calls after warm-up of each. The compiled output is checked against eager first
(with K/V quantization, both from a fresh K/V state, so that they draw the same dither).
"""
from __future__ import annotations

import argparse
import time

import torch

from ._common import emit, header, median_time, table


def capture_step(pipe, name: str) -> dict:
    """The keyword arguments of the transformer's first forward in one call of ``pipe`` (tensors detached)."""
    from hq_diffusion.models import generate

    seen: list[dict] = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(dict(kwargs))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate(pipe, name, "a red cat", 0, num_inference_steps=1)
    finally:
        handle.remove()
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in seen[0].items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hq-diffusion bench compile", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ltx", help="tiny pipeline name (default: ltx)")
    p.add_argument("--bps", type=float, default=4.0, help="weight bits per weight (default: 4)")
    p.add_argument("--kv-bps", type=float, default=None, help="also quantize attention K/V at this rate")
    p.add_argument("--repeat", type=int, default=20, help="timed calls of each (default: 20)")
    p.add_argument("--out", help="also write the markdown table here")
    args = p.parse_args(argv)

    import hq_diffusion
    from hq_diffusion.integrations.kv_processors import reset_kv_state
    from hq_diffusion.models import tiny_pipeline

    pipe = tiny_pipeline(args.model, 0)
    hq_diffusion.quantize(pipe, bps=args.bps, kv_bps=args.kv_bps, progress=False)
    kw = capture_step(pipe, args.model)
    t = pipe.transformer
    compiled = torch.compile(t, fullgraph=True)
    with torch.no_grad():
        reset_kv_state(t)
        eager_out = t(**kw)[0]
        reset_kv_state(t)
        t0 = time.perf_counter()
        out = compiled(**kw)[0]
        compile_s = time.perf_counter() - t0
        err = float((out - eager_out).abs().max())
        eager = median_time(lambda: t(**kw), repeat=args.repeat, warmup=2)
        comp = median_time(lambda: compiled(**kw), repeat=args.repeat, warmup=2)
    cmd = "hq-diffusion bench compile " + " ".join(argv or [])
    kv = f", K/V at {args.kv_bps:g} bits" if args.kv_bps is not None else ""
    text = header(f"torch.compile of one tiny {args.model} step at {args.bps:g} bps{kv}", cmd.strip()) + "\n" + table(
        ["path", "median ms / step", "first call s", "max abs(compiled - eager)"],
        [["eager", eager * 1e3, "-", "-"], ["compiled (inductor, fullgraph)", comp * 1e3, compile_s, f"{err:.2e}"]])
    emit(text, args.out)
    return 0
