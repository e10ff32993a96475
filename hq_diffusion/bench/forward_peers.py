"""One linear layer's CPU forward, HQLinear beside its peers' layers (``hq-diffusion bench speed --forward``).

Every layer quantizes the same seeded bf16 ``nn.Linear`` (N, K) and runs ``y = layer(x)`` for x (M, K) bf16;
the forwards are timed interleaved (one round runs each layer once), so machine load hits all of them alike,
and the median over rounds is reported. "bits/weight" counts every stored bit of the weight (HQ: the Rice
streams, row scales and metadata buffers; GGUF Q4_0: 18 bytes per 32 weights; NF4 / qint4: the packed
codes and their scales), bias excluded for all. Peers that are not installed, or fail, are listed with the
reason instead of a time.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable

import torch
from torch import nn

from hq_diffusion.codec import CodecConfig
from hq_diffusion.nn import cpu_forward
from hq_diffusion.nn.linear import HQLinear

from ._common import header, table

Layer = tuple[str, Callable[[], torch.Tensor], float, str]  # label, forward, stored bits/weight, note


def _snr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    err = float((y.double() - ref.double()).square().sum())
    return 10 * math.log10(float(ref.double().square().sum()) / err) if err > 0 else math.inf


def _gguf_q4_0(lin: nn.Linear, x: torch.Tensor) -> Layer:
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    qt = gguf.GGMLQuantizationType.Q4_0
    data = gguf.quants.quantize(lin.weight.detach().float().numpy(), qt)  # uint8 (N, K / 32 · 18)
    g = GGUFLinear(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.bfloat16)
    g.weight = GGUFParameter(torch.from_numpy(data), quant_type=qt)
    g.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return "diffusers GGUFLinear Q4_0", lambda: g(x), 8.0 * data.nbytes / lin.weight.numel(), "dequantize + F.linear"


def _bnb_nf4(lin: nn.Linear, x: torch.Tensor) -> Layer:
    import bitsandbytes as bnb

    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.bfloat16,
                          quant_type="nf4")
    m.load_state_dict(lin.state_dict())
    m = m.to("cpu")
    m(x)  # quantizes on first use where the weight is still float
    w = m.weight
    bits = 8.0 * sum(t.numel() * t.element_size() for t in (w.data, w.quant_state.absmax))
    return "bitsandbytes Linear4bit NF4", lambda: m(x), bits / lin.weight.numel(), "blocks of 64"


def _quanto_qint4(lin: nn.Linear, x: torch.Tensor) -> Layer:
    from optimum.quanto import freeze, qint4, quantize

    holder = nn.Sequential(nn.Linear(lin.in_features, lin.out_features).to(torch.bfloat16))
    holder[0].load_state_dict(lin.state_dict())
    quantize(holder, weights=qint4)
    freeze(holder)
    qw = holder[0].weight
    inner = [getattr(qw, name) for name in qw.__tensor_flatten__()[0]]  # packed codes, scales, shifts
    inner = [getattr(t, "_data", t) for t in inner]  # a packed tensor reports its unpacked shape: its storage
    bits = 8.0 * sum(t.numel() * t.element_size() for t in inner)
    return "optimum-quanto qint4", lambda: holder(x), bits / lin.weight.numel(), "group 128"


PEERS = {"gguf": _gguf_q4_0, "bitsandbytes": _bnb_nf4, "optimum-quanto": _quanto_qint4}


@contextlib.contextmanager
def _generic_cpu_path():
    old, cpu_forward.ENABLED = cpu_forward.ENABLED, False
    try:
        yield
    finally:
        cpu_forward.ENABLED = old


def _hq_layers(lin: nn.Linear, x: torch.Tensor, bps: float, stack: contextlib.ExitStack) -> list[Layer]:
    """HQLinear (Rice storage) three ways — the CPU codes path, the generic bf16 path, and a twin layer inside
    :func:`~hq_diffusion.nn.cpu_forward.cached_codes` (held open by ``stack``) after its first call — and with
    rANS storage through the CPU codes path."""
    m = HQLinear.from_linear(lin, CodecConfig(bps=bps, coder="rice"), key="bench.linear", storage="rice")
    bits = 8.0 * m.nbytes / lin.weight.numel() - 16.0 / lin.in_features  # bias (bf16 per row) excluded
    twin = HQLinear(m.hq_meta, name="bench.linear")
    twin.load_state_dict(m.state_dict())
    stack.enter_context(cpu_forward.cached_codes(twin))
    twin(x)
    held = 8.0 * cpu_forward.cached_bytes(twin) / lin.weight.numel()

    def generic():
        with _generic_cpu_path():
            return m(x)

    r = HQLinear.from_linear(lin, CodecConfig(bps=bps, coder="rans"), key="bench.linear", storage="rice")
    rbits = 8.0 * r.nbytes / lin.weight.numel() - 16.0 / lin.in_features
    return [("HQLinear rice, CPU codes path", lambda: m(x), bits, "decodes at every call"),
            ("HQLinear rans, CPU codes path", lambda: r(x), rbits, "decodes at every call (compiled rANS coder)"),
            ("HQLinear rice, generic bf16 path", generic, bits, "decodes at every call; the path before"),
            ("HQLinear rice, codes cached for the step", lambda: twin(x), bits,
             f"later calls of a step; +{held:.1f} bits/weight held during the step")]


def forward_table(rows: int, cols: int, tokens: int, bps: float, repeat: int, threads: int) -> str:
    """Markdown: one layer (rows × cols) forward with ``tokens`` bf16 tokens, HQ beside its peers."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(cols, rows)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(rows, cols, generator=g) / math.sqrt(cols))
            lin.bias.copy_(torch.randn(rows, generator=g) * 0.1)
        lin = lin.to(torch.bfloat16)
        x = torch.randn(tokens, cols, generator=g).to(torch.bfloat16)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
            layers, missing = _hq_layers(lin, x, bps, stack), []
            for name, build in PEERS.items():
                try:
                    layers.append(build(lin, x))
                except ImportError as e:
                    missing.append(f"{name}: not installed ({e.name or e})")
                except Exception as e:  # a peer that installs but cannot run here: say why
                    missing.append(f"{name}: could not run ({type(e).__name__}: {e})")
            snrs = [_snr_db(ref, fn().float()) for _, fn, _, _ in layers]
            times = [[] for _ in layers]
            for _ in range(repeat):
                for i, (_, fn, _, _) in enumerate(layers):
                    t = time.perf_counter()
                    fn()
                    times[i].append(time.perf_counter() - t)
        med = [statistics.median(t) for t in times]
        gg = next((i for i, lay in enumerate(layers) if "GGUF" in lay[0]), None)
        out = []
        for i, (label, _, bits, note) in enumerate(layers):
            ratio = f"{med[i] / med[gg]:.2f}×" if gg is not None else "n/a"
            out.append([label, f"{bits:.3f}", f"{med[i] * 1e3:.1f}", ratio, f"{snrs[i]:.2f}", note])
    finally:
        torch.set_num_threads(old_threads)
    cmd = (f"hq-diffusion bench speed --forward --rows {rows} --cols {cols} --tokens {tokens} --bps {bps} "
           f"--repeat {repeat} --threads {threads}")
    text = header(f"One linear layer's CPU forward, {rows}×{cols}, {tokens} bf16 tokens, {threads} thread(s), "
                  f"median of {repeat} interleaved rounds", cmd)
    text += "\n" + table(["layer", "stored bits/weight", "forward ms", "÷ GGUF Q4_0", "output SNR dB", "note"], out)
    if missing:
        text += "\n\nNot measured: " + "; ".join(missing) + ".\n"
    return text
