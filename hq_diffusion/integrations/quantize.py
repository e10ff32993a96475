"""``quantize`` a diffusers pipeline or module in place, and ``summary`` of what it did.

``quantize`` swaps every ``nn.Linear`` of the target module(s) for an :class:`~hq_diffusion.nn.linear.HQLinear`
except the layers named by the skip patterns (:mod:`.presets`), records what it did on the module
(:class:`~.state.HQState`, attribute ``hq_state``), and optionally installs the K/V quantization of
:mod:`.kv_processors`. ``summary`` reads the modules back into a :class:`QuantSummary`.

This is the core, which the diffusers backend also calls; the public ``hq_diffusion.quantize``
(:mod:`.api`) adds the diffusers quantizer to the quantized diffusers models.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..nn.linear import HQLinear
from . import presets
from .config import HQConfig, resolve_config
from .memory import release_freed_memory
from .state import STATE_ATTR, HQState, apply_kv, kv_api, set_module

ON_INVALID = ("raise", "skip")
NONFINITE = "non-finite weights (NaN/Inf), kept in the original dtype"


# ---- quantize ---------------------------------------------------------------------------------------------

def _targets(obj, components) -> dict[str, nn.Module]:
    """{prefix: module}: ``{"": obj}`` for a module, ``{name: pipe.<name>}`` for a pipeline."""
    if isinstance(obj, nn.Module):
        return {"": obj}
    if not hasattr(obj, "components"):
        raise TypeError(f"expected a diffusers pipeline or an nn.Module, got {type(obj).__name__}")
    if isinstance(components, str):
        components = (components,)
    out = {}
    for name in components:
        mod = getattr(obj, name, None)
        if not isinstance(mod, nn.Module):
            have = sorted(k for k, v in obj.components.items() if isinstance(v, nn.Module))
            raise ValueError(f"components: pipeline has no module {name!r} (modules: {have})")
        out[name] = mod
    return out


def quantize(obj, config: HQConfig | None = None, *, components=("transformer",), progress: bool = True,
             on_invalid: str = "raise", backend: str = "kernel", **overrides):
    """Quantize a diffusers pipeline's transformer (or the named ``components``), or a bare ``nn.Module``.

    Every ``nn.Linear`` becomes an :class:`~hq_diffusion.nn.linear.HQLinear` keyed by its module name, except
    those matched by ``skip`` (None: the architecture preset of :mod:`.presets`). The object is modified in
    place and returned.

    Args:
        obj: a ``DiffusionPipeline`` or an ``nn.Module`` (its weights loaded, not on ``meta``).
        config: an :class:`HQConfig`; None: ``HQConfig(**overrides)``.
        components: pipeline attributes to quantize (ignored for a bare module).
        progress: show a tqdm bar over the layers.
        on_invalid: ``"raise"`` (default): a weight with NaN/Inf raises ValueError naming the layer;
            ``"skip"``: keep such layers in their original dtype, warn naming them, list them in the summary.
        backend: ``"kernel"`` (use ``hq_diffusion.kernels`` on CUDA when available) or ``"native"``.
        **overrides: :class:`HQConfig` fields (``bps=4.0, kv_bps=4.0, ...``), when ``config`` is None;
            validated there (a bad value raises ValueError naming the field). A field given both here and
            through ``config`` raises ValueError; an unknown keyword raises TypeError listing the valid ones.

    Returns:
        ``obj``, with its modules replaced; each quantized module carries an :class:`~.state.HQState` as
        ``hq_state``.
    """
    cfg = resolve_config(config, overrides, caller="quantize",
                         other_keywords=("components", "progress", "on_invalid", "backend"))
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {list(ON_INVALID)}, got {on_invalid!r}")
    targets = _targets(obj, components)
    for prefix, mod in targets.items():
        if getattr(mod, STATE_ATTR, None) is not None or any(isinstance(m, HQLinear) for m in mod.modules()):
            raise ValueError(f"{prefix or type(mod).__name__} is already quantized")
    if cfg.kv_bps is not None:
        kv_api()  # fail before the long part when the K/V module is missing
    plans = {prefix: _plan(mod, cfg) for prefix, mod in targets.items()}
    invalid = {prefix: _check_weights(plans[prefix][0], on_invalid=on_invalid, prefix=prefix) for prefix in plans}
    total = sum(len(todo) for todo, _ in plans.values())
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="hq_diffusion: quantizing", unit="layer", disable=not progress) as bar:
        for prefix, mod in targets.items():
            todo, skipped = plans[prefix]
            state = HQState(config=cfg, skipped=skipped)
            _quantize_module(mod, cfg, todo, state, invalid=invalid[prefix], backend=backend, bar=bar)
            setattr(mod, STATE_ATTR, state)
            if cfg.kv_bps is not None:
                apply_kv(mod, state)
    return obj


def _plan(model: nn.Module, cfg: HQConfig):
    """([(name, linear)] to quantize, {name: reason} skipped) in ``named_modules`` order."""
    rules = presets.resolve_skip(model, cfg.skip)
    todo, skipped, seen = [], {}, set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or id(mod) in seen:
            continue
        seen.add(id(mod))
        reason = presets.skip_reason(name, rules)
        if reason is None:
            todo.append((name, mod))
        else:
            skipped[name] = reason
    return todo, skipped


def _check_weights(todo, *, on_invalid, prefix) -> set[str]:
    """Names of the layers with NaN/Inf weights (or ValueError for the first one when on_invalid="raise")."""
    bad = set()
    for name, lin in todo:
        w = lin.weight
        full = f"{prefix}.{name}" if prefix else name
        if w.device.type == "meta":
            raise ValueError(f"layer {full!r}: weight is on the meta device; load the weights before quantizing")
        if not check_finite(w, f"layer {full!r}", full, on_invalid=on_invalid,
                            hint="quantize(..., on_invalid='skip') keeps such layers unquantized", stacklevel=5):
            bad.add(name)
    return bad


def check_finite(w: torch.Tensor, what: str, layer: str, *, on_invalid: str, hint: str, error=ValueError,
                 stacklevel: int = 3) -> bool:
    """True when the weight ``w`` is finite; else raise ``error`` naming ``what`` (``on_invalid="raise"``) or
    warn naming ``layer`` and return False (``"skip"``: the layer stays unquantized)."""
    if bool(torch.isfinite(w).all()):
        return True
    if on_invalid == "raise":
        raise error(f"{what} has {int(torch.isnan(w).sum())} NaN and {int(torch.isinf(w).sum())} Inf weights; "
                    f"refusing to quantize it ({hint})")
    warnings.warn(f"layer {layer!r} has non-finite weights; kept in {w.dtype} (on_invalid='skip')",
                  stacklevel=stacklevel)
    return False


def _quantize_module(model, cfg, todo, state, *, invalid, backend, bar):
    codec_cfg = cfg.codec_config()
    replaced: dict[int, HQLinear] = {}
    for i in range(len(todo)):
        # take the layer out of the plan: once swapped out of the model, nothing here keeps its float weight
        # alive, so the peak is the loaded model plus one layer's encoding work
        name, lin = todo[i]
        todo[i] = (name, None)
        if name in invalid:
            state.skipped[name] = NONFINITE
            bar.update(1)
            continue
        with torch.no_grad():
            hq = HQLinear.from_linear(lin, codec_cfg, key=name, mma=cfg.mma, storage=cfg.storage,
                                      backend=backend, name=name)
        replaced[id(lin)] = hq
        set_module(model, name, hq)
        del lin
        release_freed_memory()  # the float weight and the encoder's work space, else kept in glibc's arenas
        bar.update(1)
    # a Linear shared under several names is replaced everywhere by the same HQLinear
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if id(mod) in replaced and not isinstance(mod, HQLinear):
            set_module(model, name, replaced[id(mod)])


# ---- summary ----------------------------------------------------------------------------------------------

@dataclass
class LayerReport:
    """One quantized layer. ``bps``: stored bits / weights; ``snr_db``: decoded weight vs the original
    (measured at quantize time); ``bytes_bf16``: 2 × weights + 2 × bias; ``bytes_quantized``: every tensor
    the HQLinear owns (buffers and bias, as held)."""

    name: str
    in_features: int
    out_features: int
    bps: float
    snr_db: float | None
    bytes_bf16: int
    bytes_quantized: int
    storage: str
    mma: str


@dataclass
class SkippedReport:
    """One ``nn.Linear`` left unquantized, its reason and the bytes it holds (weight and bias as held)."""

    name: str
    in_features: int
    out_features: int
    reason: str
    bytes: int


@dataclass
class QuantSummary:
    """Per-layer rates, SNR and bytes of a quantized model; totals over the quantized layers.

    Totals: ``bytes_bf16`` / ``bytes_quantized`` summed over quantized layers, ``ratio`` their quotient,
    ``mean_bps`` the plain mean of the layer rates, ``weighted_bps`` total stored bits / total weights,
    ``bytes_skipped`` what the skipped linears hold. ``kv``: per quantized component, what
    :func:`.kv_processors.kv_summary` reports (None when K/V quantization is off).
    """

    layers: list[LayerReport]
    skipped: list[SkippedReport]
    bytes_bf16: int
    bytes_quantized: int
    bytes_skipped: int
    ratio: float | None
    mean_bps: float | None
    weighted_bps: float | None
    kv: dict | None = None
    config: dict | None = None

    def to_dict(self) -> dict:
        """JSON-safe dict (non-finite floats become None)."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {str(k): clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v
        return clean(asdict(self))

    def __str__(self) -> str:
        rows = [("layer", "in", "out", "bps", "SNR dB", "bf16 KiB", "HQ KiB", "ratio", "storage", "mma")]
        for r in self.layers:
            rows.append((r.name, str(r.in_features), str(r.out_features), f"{r.bps:.3f}",
                         "-" if r.snr_db is None else f"{r.snr_db:.2f}", f"{r.bytes_bf16 / 1024:.1f}",
                         f"{r.bytes_quantized / 1024:.1f}", f"{r.bytes_bf16 / max(r.bytes_quantized, 1):.2f}x",
                         r.storage, r.mma))
        out = [_table(rows, right={1, 2, 3, 4, 5, 6, 7})]
        if self.skipped:
            srows = [("skipped layer", "in", "out", "KiB", "reason")]
            srows += [(s.name, str(s.in_features), str(s.out_features), f"{s.bytes / 1024:.1f}", s.reason)
                      for s in self.skipped]
            out += ["", _table(srows, right={1, 2, 3})]
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        out += ["", f"quantized layers: {len(self.layers)}   skipped: {len(self.skipped)}",
                f"bytes bf16 → quantized: {self.bytes_bf16:,} → {self.bytes_quantized:,} "
                f"(ratio {fmt(self.ratio, '.3f')}x)   skipped layers hold {self.bytes_skipped:,} bytes",
                f"bps: mean {fmt(self.mean_bps, '.3f')}   weighted {fmt(self.weighted_bps, '.3f')}"]
        for comp, info in (self.kv or {}).items():
            out.append(_kv_line(comp, info))
        return "\n".join(out)


def _kv_line(component: str, info: dict) -> str:
    """One printable line for a component's K/V quantization (``kv_summary`` output)."""
    s = (info or {}).get("summary") or {}
    cfg = (s.get("config") or {}).get("_data") or {}
    correction = cfg.get("rotation", "?") + ("+dither" if cfg.get("dither") else "")
    head = (f"K/V ({component}): {cfg.get('bps', '?')} bps target, {cfg.get('lattice', '?')}, {correction}, "
            f"{s.get('modules', len(info.get('modules') or []))} attention modules")
    bits = s.get("bits_per_scalar")
    if bits is None:
        return head + "; not measured yet (rates are measured during generation)"
    b = s.get("breakdown") or {}
    return (head + f"; measured {bits:.3f} bits/scalar (payload {b.get('payload', float('nan')):.3f} + side "
            f"{b.get('side', float('nan')):.3f} + norms {b.get('norms', float('nan')):.3f}), "
            f"{s.get('compression', float('nan')):.2f}x vs fp16 over {s.get('calls', 0)} calls")


def _table(rows, right=frozenset()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def summary(obj) -> QuantSummary:
    """Summarize a model or pipeline quantized by :func:`quantize` (or loaded by ``load_quantized``).

    Raises ValueError when nothing in ``obj`` is quantized."""
    if isinstance(obj, nn.Module):
        targets = {"": obj}
    elif hasattr(obj, "components"):
        targets = {k: v for k, v in obj.components.items() if isinstance(v, nn.Module)}
    else:
        raise TypeError(f"expected a diffusers pipeline or an nn.Module, got {type(obj).__name__}")
    layers, skipped, kv, config = [], [], {}, None
    found = False
    for prefix, mod in targets.items():
        state = getattr(mod, STATE_ATTR, None)
        hq = [(n, m) for n, m in mod.named_modules() if isinstance(m, HQLinear)]
        if state is None and not hq:
            continue
        found = True
        pre = f"{prefix}." if prefix else ""
        for name, m in hq:
            numel = m.in_features * m.out_features
            bias_bf16 = 0 if m.bias is None else 2 * m.bias.numel()
            dev = next(iter(m.buffers())).device
            mma = m.mma if m.mma != "auto" else f"auto→{m.resolved_mma(dev)}"
            layers.append(LayerReport(pre + name, m.in_features, m.out_features, float(m.hq_meta["bps"]),
                                      m.hq_meta.get("snr_db"), 2 * numel + bias_bf16, m.nbytes, m.storage, mma))
        if state is not None:
            config = state.config.to_dict()
            order = {n: i for i, (n, _) in enumerate(mod.named_modules())}
            for name, reason in sorted(state.skipped.items(), key=lambda kv: order.get(kv[0], len(order))):
                lin = mod.get_submodule(name)
                skipped.append(SkippedReport(pre + name, lin.in_features, lin.out_features, reason,
                                             _tensor_bytes(lin.weight, lin.bias)))
            if state.kv is not None:
                info = kv_api().kv_summary(mod)
                kv[prefix or type(mod).__name__] = {"config": state.kv, "modules": list(state.kv_modules),
                                                    "summary": info}
    if not found:
        raise ValueError("nothing is quantized here: run hq_diffusion.quantize first")
    b16 = sum(r.bytes_bf16 for r in layers)
    bq = sum(r.bytes_quantized for r in layers)
    numel = sum(r.in_features * r.out_features for r in layers)
    return QuantSummary(
        layers=layers, skipped=skipped, bytes_bf16=b16, bytes_quantized=bq,
        bytes_skipped=sum(s.bytes for s in skipped),
        ratio=b16 / bq if bq else None,
        mean_bps=sum(r.bps for r in layers) / len(layers) if layers else None,
        weighted_bps=sum(r.bps * r.in_features * r.out_features for r in layers) / numel if numel else None,
        kv=kv or None, config=config)


__all__ = ["quantize", "summary", "QuantSummary", "LayerReport", "SkippedReport"]
