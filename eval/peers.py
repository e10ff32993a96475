"""The peer the quality sweep compares hq-diffusion against: round-to-nearest int-b weights with one fp16 scale
and one fp16 minimum per group of weights along the input axis (RTN int4 g128 is the widely used 4-bit
baseline), at its real stored rate ``b + 32 / group`` bits per weight.

The peer is *simulated*: each weight is replaced in place by its dequantized value (in the layer's dtype), and
its rate is counted from what an int-b store would hold (codes + fp16 scale + fp16 minimum per group).  It is
applied to exactly the linears hq-diffusion quantizes (the family's skip rules,
:mod:`hq_diffusion.integrations.presets`), so both schemes change the same layers.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["rtn_groupwise", "rtn_quantize", "rtn_summary", "rtn_bps", "RTN_RECORD"]

#: attribute of a component module that holds what :func:`rtn_quantize` did
RTN_RECORD = "hq_rtn_record"


def rtn_bps(bits: int, group: int) -> float:
    """The stored rate of RTN int-``bits`` with ``group``-weight groups: codes + fp16 scale + fp16 minimum."""
    return bits + 32.0 / group


def rtn_groupwise(w: torch.Tensor, bits: int, group: int = 128) -> tuple[torch.Tensor, int]:
    """Round-to-nearest int-``bits``, asymmetric (min/max) per group of ``group`` consecutive weights of a row,
    fp16 scale and fp16 minimum.

    Args:
        w: float (R, C) with C % group == 0.
    Returns:
        (float32 (R, C) reconstruction, total stored bits = R*C*bits + (R*C/group)*32).
    """
    r, c = w.shape
    if c % group:
        raise ValueError(f"rtn_groupwise: {c} columns are not a multiple of the group {group}")
    g = w.float().reshape(r, c // group, group)
    lo = g.amin(-1, keepdim=True).half().float()
    hi = g.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).half().float().clamp_min(1e-8)
    q = torch.round((g - lo) / scale).clamp(0, levels)
    w_hat = (q * scale + lo).reshape(r, c)
    return w_hat, w.numel() * bits + (w.numel() // group) * 32


def _planned_linears(model: torch.nn.Module, skip) -> tuple[list[tuple[str, torch.nn.Linear]], list[str]]:
    """([(name, linear)] hq-diffusion would quantize, [skipped names]), in ``named_modules`` order."""
    from hq_diffusion.integrations import presets

    rules = presets.resolve_skip(model, skip)
    todo, skipped, seen = [], [], set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and id(mod) not in seen:
            seen.add(id(mod))
            (skipped.append(name) if presets.skip_reason(name, rules) else todo.append((name, mod)))
    return todo, skipped


@torch.no_grad()
def rtn_quantize(pipe: Any, bps: float | None = None, *, bits: int = 4, group: int = 128, skip=None,
                 components: tuple[str, ...] = ("transformer",), progress: bool = False, **_ignored) -> Any:
    """Apply the RTN int-``bits`` group-``group`` peer to ``pipe``'s components in place (a layer with fewer
    inputs than ``group``, or a non-multiple, uses its whole row as one group; its rate counts that).

    ``bps``, when given, must be this peer's own rate (:func:`rtn_bps`); the eval runner passes it.  Other
    keywords of ``hq_diffusion.quantize`` (lattice, mma, storage, ...) do not apply and are ignored, except
    ``kv_bps``, which raises (the peer quantizes weights only).  Returns ``pipe``.
    """
    if _ignored.get("kv_bps") is not None:
        raise ValueError("the RTN peer quantizes weights only; K/V quantization (kv_bps) does not apply")
    if bps is not None and abs(float(bps) - rtn_bps(bits, group)) > 1e-9:
        raise ValueError(f"RTN int{bits} g{group} stores {rtn_bps(bits, group):g} bits per weight, not {bps:g}")
    from tqdm import tqdm

    for comp in components:
        model = getattr(pipe, comp)
        todo, skipped = _planned_linears(model, skip)
        total_bits = weights = 0
        for _, lin in tqdm(todo, desc=f"RTN int{bits} {comp}", disable=not progress, leave=False):
            w = lin.weight.data
            g = group if w.shape[1] % group == 0 else w.shape[1]
            w_hat, b = rtn_groupwise(w, bits, g)
            lin.weight.data = w_hat.to(device=w.device, dtype=w.dtype)
            total_bits += b
            weights += w.numel()
        setattr(model, RTN_RECORD, {"bits": bits, "group": group, "total_bits": total_bits, "weights": weights,
                                    "layers": [n for n, _ in todo], "skipped": skipped})
    return pipe


def rtn_summary(pipe: Any, components: tuple[str, ...] = ("transformer",)) -> dict:
    """What :func:`rtn_quantize` did, in the keys of ``hq_diffusion.summary(pipe).to_dict()`` the reports
    read: ``{"summary": {"weighted_bps", "ratio", "bytes_bf16", "bytes_quantized", "layers", "skipped",
    "scheme"}, "text": str}``.  Raises ValueError if ``pipe`` was not RTN-quantized."""
    recs = [getattr(getattr(pipe, c), RTN_RECORD, None) for c in components]
    if any(r is None for r in recs):
        raise ValueError("rtn_summary: the pipeline was not quantized by rtn_quantize")
    total_bits = sum(r["total_bits"] for r in recs)
    weights = sum(r["weights"] for r in recs)
    bits, group = recs[0]["bits"], recs[0]["group"]
    s = {"weighted_bps": total_bits / weights, "ratio": 16.0 * weights / total_bits,
         "bytes_bf16": 2 * weights, "bytes_quantized": total_bits // 8,
         "layers": [n for r in recs for n in r["layers"]], "skipped": [n for r in recs for n in r["skipped"]],
         "scheme": f"RTN int{bits} g{group} (fp16 scale + fp16 minimum per group; simulated: dequantized "
                   f"weights in the pipeline dtype, rate counted as stored)"}
    text = (f"RTN int{bits} g{group}: {len(s['layers'])} linears, {s['weighted_bps']:.3f} bits/weight, "
            f"{s['ratio']:.2f}x vs bf16")
    return {"summary": s, "text": text}
