"""Quantize-on-load for ``ModelMixin.from_pretrained(d, quantization_config=HQConfig(...))``.

diffusers loads a float checkpoint parameter by parameter into a model built on ``meta``; the hq-diffusion
quantizer (:mod:`.diffusers_backend`) calls in here through its per-parameter hooks so that each planned
``nn.Linear`` is encoded the moment its weight arrives, and no float copy of a quantized layer ever exists in
the model:

- :func:`prepare` (``_process_model_before_weight_loading``): the plan of :func:`~.quantize.quantize` (skip
  rules) on the meta model;
- :func:`is_target` (``check_if_quantized_param``): whether a parameter is the weight or bias of a planned layer;
- :func:`create` (``create_quantized_param``): encode the layer (its bias taken from the same shard, or applied
  when it arrives later) and swap in the :class:`~hq_diffusion.nn.linear.HQLinear`, on the parameter's device
  (a CUDA device encodes there);
- :func:`finish` (``_process_model_after_weight_loading``): record the :class:`~.state.HQState` (and K/V).

The peak is then the loaded non-quantized part + the quantized layers + the shard diffusers holds + one layer's
encoding work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..nn.linear import HQLinear
from .config import HQConfig
from .quantize import _plan
from .state import STATE_ATTR, HQState, apply_kv, set_module

ATTR = "_hq_on_load"


@dataclass
class OnLoad:
    """The plan of one quantize-on-load: layer name → has a bias; skipped layers; biases waiting for weights."""

    config: HQConfig
    layers: dict[str, bool]
    skipped: dict[str, str]
    pending_bias: dict[str, torch.Tensor] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)


def prepare(quantizer, model, config: HQConfig) -> None:
    """Plan the layers of the meta ``model`` that loading will quantize (``quantize``'s plan)."""
    todo, skipped = _plan(model, config)
    setattr(quantizer, ATTR, OnLoad(config, {n: lin.bias is not None for n, lin in todo}, skipped))


def _split(name: str) -> tuple[str, str]:
    layer, _, leaf = name.rpartition(".")
    return layer, leaf


def is_target(quantizer, param_name: str) -> bool:
    """Whether ``param_name`` is the weight or bias of a layer planned by :func:`prepare`."""
    plan = getattr(quantizer, ATTR, None)
    if plan is None:
        return False
    layer, leaf = _split(param_name)
    return layer in plan.layers and leaf in ("weight", "bias")


def _cast(t: torch.Tensor, dtype, like) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.to(dtype if dtype is not None else like.dtype)


def create(quantizer, model, param: torch.Tensor, param_name: str, device, state_dict: dict, dtype=None) -> None:
    """Encode the layer of ``param_name`` when its weight arrives (ValueError naming it for NaN/Inf weights);
    a bias arriving before its weight (another shard) waits, one arriving after is copied into the HQLinear."""
    plan: OnLoad = getattr(quantizer, ATTR)
    layer, leaf = _split(param_name)
    cfg = plan.config
    current = model.get_submodule(layer)
    if leaf == "bias":
        if layer in plan.done:
            current.bias.data.copy_(_cast(param, current.bias.dtype, current.bias))
        elif f"{layer}.weight" not in state_dict:
            plan.pending_bias[layer] = param
        return
    w = _cast(param, dtype, current.weight)
    bias = None
    if plan.layers[layer]:
        src = state_dict.get(f"{layer}.bias", plan.pending_bias.pop(layer, None))
        if src is None:
            raise ValueError(f"{layer}.bias: missing from the checkpoint (its weight {param_name} is there)")
        bias = _cast(src, dtype, current.bias)
    dev = torch.device(device if device is not None else "cpu") if not isinstance(device, int) else \
        torch.device("cuda", device)
    if dev.type not in ("cpu", "cuda"):
        dev = torch.device("cpu")  # "disk"/"meta" offload targets are refused by validate_environment
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{param_name}: {int(torch.isnan(w).sum())} NaN and {int(torch.isinf(w).sum())} Inf "
                         f"weights; refusing to quantize this layer (quantize a loaded model with "
                         f"on_invalid='skip' to keep it unquantized)")
    with torch.no_grad():
        hq = HQLinear.from_linear(SimpleNamespace(weight=w.to(dev), bias=None if bias is None else bias.to(dev)),
                                  cfg.codec_config(), key=layer, mma=cfg.mma, storage=cfg.storage, name=layer)
    set_module(model, layer, hq)
    plan.done.add(layer)


def finish(quantizer, model) -> bool:
    """Record the :class:`HQState` of a model quantized on load; False when :func:`prepare` did not run (the
    caller then quantizes the loaded model). A planned layer whose weight never arrived is an error."""
    plan: OnLoad | None = getattr(quantizer, ATTR, None)
    if plan is None:
        return False
    missing = sorted(set(plan.layers) - plan.done)
    if missing:
        raise ValueError(f"weights of {len(missing)} planned layer(s) were not in the checkpoint: {missing[:5]}")
    state = HQState(config=plan.config, skipped=dict(plan.skipped))
    setattr(model, STATE_ATTR, state)
    if plan.config.kv_bps is not None:
        apply_kv(model, state)
    delattr(quantizer, ATTR)
    return True


__all__ = ["prepare", "is_target", "create", "finish", "OnLoad"]
