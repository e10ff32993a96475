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
- :func:`lazy_shard` (``maybe_update_state_dict``): the state dict diffusers just read is replaced by a
  :class:`LazyShard` that reads each tensor from its file only when the loader asks for it;
- :func:`finish` (``_process_model_after_weight_loading``): record the :class:`~.state.HQState` (and K/V).

Why :class:`LazyShard`: diffusers reads a shard with ``safetensors.torch.load_file``, whose tensors are views
of ONE private memory map of the whole file. A non-quantized parameter copied into the model keeps that map
alive, so every page the encoder read (every quantized weight) stays resident to the end: the whole shard.
Read one by one with plain file reads, a quantized weight's float tensor lives only while it is encoded.

Two more things keep the peak at the imports + the finished model, or the largest layer's encoding if more
(BENCHMARKS.md §20b: 2.85 → 1.81 GB on the real-width LTX-2 slice):

- the :class:`LazyShard` yields the shard's planned weights first, largest first (:func:`encode_order`), so
  that the big encode work spaces come while the model holds only the layers encoded so far, not yet the
  shard's float tensors (diffusers' ``load_model_dict_into_meta`` loads in the state dict's iteration order);
- after each layer, :func:`release_freed_memory` gives the encoder's freed work space back to the system
  (glibc otherwise keeps it mapped in the heaps of torch's threads: +0.35 GB left over on that slice).
"""
from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..nn.linear import HQLinear
from .config import HQConfig
from .memory import release_freed_memory
from .quantize import _plan
from .shards import read_header, read_tensor
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
    files: list[str] = field(default_factory=list)
    headers: dict[str, tuple[dict, int]] = field(default_factory=dict)


def prepare(quantizer, model, config: HQConfig) -> None:
    """Plan the layers of the meta ``model`` that loading will quantize (``quantize``'s plan)."""
    todo, skipped = _plan(model, config)
    setattr(quantizer, ATTR, OnLoad(config, {n: lin.bias is not None for n, lin in todo}, skipped,
                                    files=list(getattr(quantizer, "_hq_on_load_files", []))))


class LazyShard(MutableMapping):
    """name → tensor of one safetensors ``file``, read (:func:`~.shards.read_tensor`, no memory map) each time
    it is looked up; the keys are those of the state dict it replaces (``eager``: that dict, whose tensors are
    never touched; a key the file lacks — renamed by the model's key fixes — is served from it). Iteration
    (the order diffusers loads in) yields the keys of ``first`` that the dict has, in that order, then the rest
    in the dict's order."""

    def __init__(self, file: str, table: dict, data_start: int, eager: dict, first: list[str] | None = None):
        self.file, self._table, self._start, self._eager = file, table, data_start, eager
        lead = [k for k in first or [] if k in eager]
        chosen = set(lead)
        self._keys = lead + [k for k in eager if k not in chosen]

    def __getitem__(self, key):
        if key not in self._eager:
            raise KeyError(key)
        entry = self._table.get(key)
        return self._eager[key] if entry is None else read_tensor(self.file, key, entry, self._start)

    def __contains__(self, key):
        return key in self._eager

    def __iter__(self):
        return iter(list(self._keys))

    def __len__(self):
        return len(self._keys)

    def __setitem__(self, key, value):
        self._table.pop(key, None)
        if key not in self._eager:
            self._keys.append(key)
        self._eager[key] = value

    def __delitem__(self, key):
        del self._eager[key]
        self._keys.remove(key)


def note_files(quantizer, checkpoint_files) -> None:
    """Remember the checkpoint files diffusers resolved (``maybe_update_loaded_keys``) for :func:`lazy_shard`."""
    plan = getattr(quantizer, ATTR, None)
    files = [str(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
    if plan is not None:
        plan.files = files
    else:
        quantizer._hq_on_load_files = files


def lazy_shard(quantizer, state_dict):
    """``state_dict`` (one shard, as diffusers read it) as a :class:`LazyShard` over the checkpoint file that
    holds its tensors; ``state_dict`` itself when no quantize-on-load is in progress or no safetensors file of
    the checkpoint holds its keys (then the eager dict is used, as diffusers would)."""
    plan: OnLoad | None = getattr(quantizer, ATTR, None)
    if plan is None or not isinstance(state_dict, dict) or not state_dict:
        return state_dict
    files = plan.files or getattr(quantizer, "_hq_on_load_files", [])
    keys = set(state_dict)
    for f in files:
        if f not in plan.headers:
            plan.headers[f] = read_header(Path(f))
        table, start = plan.headers[f]
        if keys & set(table):
            mine = {k: v for k, v in table.items() if k in keys}
            return LazyShard(f, mine, start, state_dict, first=encode_order(plan, mine))
    return state_dict


def encode_order(plan: OnLoad, table: dict) -> list[str]:
    """The weights of ``plan``'s layers that ``table`` (a :func:`~.shards.read_header` table) holds, largest
    first: diffusers loads them before the shard's other tensors, so that each layer is encoded while the
    model holds only the layers encoded before it, not yet the shard's float tensors (the largest encode work
    space meets the smallest model)."""
    names = [f"{layer}.weight" for layer in plan.layers if f"{layer}.weight" in table]
    return sorted(names, key=lambda k: (-(table[k][3] - table[k][2]), k))


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
    del w, bias, hq
    release_freed_memory()


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


__all__ = ["prepare", "is_target", "create", "finish", "OnLoad", "LazyShard", "lazy_shard", "note_files",
           "encode_order", "release_freed_memory"]
